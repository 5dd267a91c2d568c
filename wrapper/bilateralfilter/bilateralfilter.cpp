#include "bilateralfilter.h"

#include <cmath>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>

#include "permutohedral.h"

namespace {

constexpr int kFeatureDim = 5;

void require_positive(const char* name, int64_t value) {
    if (value < 1) throw std::invalid_argument(std::string(name) + " must be >= 1, got " + std::to_string(value));
}

void require_sigma(const char* name, float value) {
    if (!(value > 0.0f) || !std::isfinite(value)) {
        throw std::invalid_argument(std::string(name) + " must be a finite number > 0, got " + std::to_string(value));
    }
}

void require_size(const char* name, int64_t size, int64_t expected, const char* shape) {
    if (size != expected) {
        throw std::invalid_argument(std::string(name) + " has " + std::to_string(size) + " elements, expected " +
                                    shape + " = " + std::to_string(expected));
    }
}

void filter_image(const float* image, const float* in, float* out, int channels, int H, int W, float sigma_rgb,
                  float sigma_xy) {
    const int64_t num_points = static_cast<int64_t>(H) * W;
    std::unique_ptr<float[]> features(new float[kFeatureDim * num_points]);  // every value written below
    float* x = features.get();
    float* y = x + num_points;
    for (int row = 0; row < H; ++row) {
        for (int col = 0; col < W; ++col) {
            x[static_cast<int64_t>(row) * W + col] = float(col) / sigma_xy;
            y[static_cast<int64_t>(row) * W + col] = float(row) / sigma_xy;
        }
    }
    for (int c = 0; c < 3; ++c) {
        float* colour = y + (c + 1) * num_points;
        for (int64_t p = 0; p < num_points; ++p) colour[p] = image[c * num_points + p] / sigma_rgb;
    }
    const permutohedral::Lattice lattice(features.get(), kFeatureDim, num_points);
    lattice.filter(in, out, channels);
}

}  // namespace

void bilateralfilter(const float* image, int64_t image_size, const float* in, int64_t in_size, float* out,
                     int64_t out_size, int H, int W, float sigma_rgb, float sigma_xy) {
    require_positive("H", H);
    require_positive("W", W);
    require_sigma("sigma_rgb", sigma_rgb);
    require_sigma("sigma_xy", sigma_xy);
    const int64_t pixels = static_cast<int64_t>(H) * W;
    require_size("image", image_size, 3 * pixels, "3*H*W");
    require_size("in", in_size, pixels, "H*W");
    require_size("out", out_size, pixels, "H*W");
    filter_image(image, in, out, 1, H, W, sigma_rgb, sigma_xy);
}

void bilateralfilter_batch(const float* images, int64_t images_size, const float* ins, int64_t ins_size,
                           float* outs, int64_t outs_size, int N, int K, int H, int W, float sigma_rgb,
                           float sigma_xy) {
    require_positive("N", N);
    require_positive("K", K);
    require_positive("H", H);
    require_positive("W", W);
    require_sigma("sigma_rgb", sigma_rgb);
    require_sigma("sigma_xy", sigma_xy);
    const int64_t pixels = static_cast<int64_t>(H) * W;
    require_size("images", images_size, N * 3 * pixels, "N*3*H*W");
    require_size("ins", ins_size, N * K * pixels, "N*K*H*W");
    require_size("outs", outs_size, N * K * pixels, "N*K*H*W");
    // One task per image; a thread left without an image takes pieces of the others' parallel loops
    // (permutohedral.cpp), so unequal images and N < threads keep every thread busy. An exception
    // must not leave a task: keep the first and rethrow after the region.
    std::exception_ptr failure;
#pragma omp parallel
#pragma omp single
    for (int n = 0; n < N; ++n) {
#pragma omp task firstprivate(n) shared(failure)
        try {
            const int64_t offset = static_cast<int64_t>(n) * K * pixels;
            filter_image(images + n * 3 * pixels, ins + offset, outs + offset, K, H, W, sigma_rgb, sigma_xy);
        } catch (...) {
#pragma omp critical(bilateralfilter_failure)
            if (!failure) failure = std::current_exception();
        }
    }
    if (failure) std::rethrow_exception(failure);
}
