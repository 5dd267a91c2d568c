// SWIG interface of the `bilateralfilter` module. numpy wheels ship no numpy.i, so the typemaps
// below use the numpy C API directly: arrays must be C-contiguous float32 (any shape, read flat).
%module bilateralfilter

%{
#define SWIG_FILE_WITH_INIT
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#include <new>
#include <stdexcept>
#include <string>
#include "bilateralfilter.h"

// Returns the array behind `obj` or sets a Python error naming the argument and returns NULL.
static PyArrayObject* bilateral_float_array(PyObject* obj, const char* name, bool writeable) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray of float32, got %s", name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject* array = (PyArrayObject*)obj;
    if (PyArray_TYPE(array) != NPY_FLOAT32) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype float32, got %s", name,
                     PyArray_DESCR(array)->typeobj->tp_name);
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(array)) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous (use numpy.ascontiguousarray)", name);
        return NULL;
    }
    if (writeable && !PyArray_ISWRITEABLE(array)) {
        PyErr_Format(PyExc_ValueError, "%s must be writeable: the result is written into it", name);
        return NULL;
    }
    return array;
}
%}

%init %{
import_array();
%}

%include <stdint.i>

%typemap(in) (const float* FLAT_INPUT, int64_t FLAT_INPUT_SIZE) {
    PyArrayObject* array = bilateral_float_array($input, "$1_name", false);
    if (array == NULL) SWIG_fail;
    $1 = ($1_ltype)PyArray_DATA(array);
    $2 = (int64_t)PyArray_SIZE(array);
}

%typemap(in) (float* FLAT_OUTPUT, int64_t FLAT_OUTPUT_SIZE) {
    PyArrayObject* array = bilateral_float_array($input, "$1_name", true);
    if (array == NULL) SWIG_fail;
    $1 = ($1_ltype)PyArray_DATA(array);
    $2 = (int64_t)PyArray_SIZE(array);
}

%apply (const float* FLAT_INPUT, int64_t FLAT_INPUT_SIZE) {
    (const float* image, int64_t image_size), (const float* in, int64_t in_size),
    (const float* images, int64_t images_size), (const float* ins, int64_t ins_size)
};
%apply (float* FLAT_OUTPUT, int64_t FLAT_OUTPUT_SIZE) {
    (float* out, int64_t out_size), (float* outs, int64_t outs_size)
};

// The filter runs without the GIL; C++ errors become ValueError / MemoryError.
%exception {
    std::string bilateral_error;
    bool bilateral_out_of_memory = false;
    Py_BEGIN_ALLOW_THREADS
    try {
        $action
    } catch (const std::bad_alloc&) {
        bilateral_out_of_memory = true;
    } catch (const std::exception& error) {
        bilateral_error = error.what();
        if (bilateral_error.empty()) bilateral_error = "bilateral filter failed";
    }
    Py_END_ALLOW_THREADS
    if (bilateral_out_of_memory) {
        PyErr_NoMemory();
        SWIG_fail;
    }
    if (!bilateral_error.empty()) {
        PyErr_SetString(PyExc_ValueError, bilateral_error.c_str());
        SWIG_fail;
    }
}

%feature("autodoc", "bilateralfilter(image, in, out, H, W, sigma_rgb, sigma_xy)\n\n"
         "Filter one (H, W) channel `in` of the (3, H, W) image into `out` (flat float32, in place).") bilateralfilter;
%feature("autodoc", "bilateralfilter_batch(images, ins, outs, N, K, H, W, sigma_rgb, sigma_xy)\n\n"
         "Filter (N, K, H, W) `ins` with (N, 3, H, W) `images` into `outs` (flat float32, in place).") bilateralfilter_batch;

%include "bilateralfilter.h"
