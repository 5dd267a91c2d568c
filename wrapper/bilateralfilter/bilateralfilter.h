// Bilateral filter of float images through the permutohedral lattice, with the interface of the
// released rloss/RRM `bilateralfilter` module (flat float32 arrays, output written in place).
// Features per pixel: (x/sigma_xy, y/sigma_xy, r/sigma_rgb, g/sigma_rgb, b/sigma_rgb), x = column.
#pragma once

#include <cstdint>

// image: (3, H, W); in, out: (H, W). Throws std::invalid_argument on bad sizes or parameters.
void bilateralfilter(const float* image, int64_t image_size, const float* in, int64_t in_size,
                     float* out, int64_t out_size, int H, int W, float sigma_rgb, float sigma_xy);

// images: (N, 3, H, W); ins, outs: (N, K, H, W); all K channels of an image in one lattice pass.
// Runs on OpenMP's threads (OMP_NUM_THREADS), one task per image, and threads without an image
// take pieces of the others' loops; the result does not depend on the thread count.
void bilateralfilter_batch(const float* images, int64_t images_size, const float* ins,
                           int64_t ins_size, float* outs, int64_t outs_size, int N, int K, int H,
                           int W, float sigma_rgb, float sigma_xy);
