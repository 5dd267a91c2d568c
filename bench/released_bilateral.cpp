// Baseline for bench_bilateral.py: the released rloss/RRM `bilateralfilter_batch` algorithm as it
// runs on x86-64, written out again for timing (the released module is not vendored here).
//
// What "as it runs" means, from the released wrapper/bilateralfilter sources:
// - permutohedral.hpp defines SSE_PERMUTOHEDRAL whenever __SSE__ is defined (always on x86-64),
//   so init() and compute() take their SSE branches: points are elevated four at a time in
//   __m128 lanes, rounding is _mm_cvtps_epi32 (round half to even), and compute() keeps one
//   __m128 per lattice vertex even for a single value channel.
// - The hash table stores short keys, starts with capacity 2N (N = number of pixels), probes
//   linearly, hashes with r = (r + k) * 1664525, and doubles when half full.
// - bilateralfilter() builds one lattice per image and then, for each of the K channels, copies
//   the channel out, calls compute(out, in, 1) (which allocates and zeroes two (M+2)-vertex
//   buffers, splats, blurs along the d+1 axes and slices) and copies the result back.
// - bilateralfilter_batch() sets omp_set_num_threads(min(max_threads, N)) and runs the N images
//   with `#pragma omp parallel for`.
// Built by the bench with Python's own compile flags plus -fopenmp, as the released setup.py does.
#include <emmintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

class ShortKeyTable {
public:
    ShortKeyTable(int key_size, size_t points)
        : key_size_(key_size), capacity_(2 * points), keys_((points + 10) * key_size), slots_(capacity_, -1) {}

    int size() const { return static_cast<int>(filled_); }
    const short* key(int id) const { return keys_.data() + static_cast<size_t>(id) * key_size_; }

    int find(const short* key, bool create) {
        if (2 * filled_ >= capacity_) grow();
        for (size_t slot = hash(key) % capacity_;; slot = slot + 1 < capacity_ ? slot + 1 : 0) {
            const int id = slots_[slot];
            if (id == -1) {
                if (!create) return -1;
                std::memcpy(keys_.data() + filled_ * key_size_, key, key_size_ * sizeof(short));
                return slots_[slot] = static_cast<int>(filled_++);
            }
            if (std::memcmp(this->key(id), key, key_size_ * sizeof(short)) == 0) return id;
        }
    }

private:
    size_t hash(const short* key) const {
        size_t r = 0;
        for (size_t i = 0; i < key_size_; ++i) {
            r += key[i];
            r *= 1664525;
        }
        return r;
    }

    void grow() {
        const size_t old_capacity = capacity_;
        capacity_ *= 2;
        keys_.resize((old_capacity + 10) * key_size_);
        std::vector<int> old_slots(capacity_, -1);
        old_slots.swap(slots_);
        for (size_t s = 0; s < old_capacity; ++s) {
            if (old_slots[s] < 0) continue;
            size_t slot = hash(key(old_slots[s])) % capacity_;
            while (slots_[slot] >= 0) slot = slot + 1 < capacity_ ? slot + 1 : 0;
            slots_[slot] = old_slots[s];
        }
    }

    size_t key_size_, filled_ = 0, capacity_;
    std::vector<short> keys_;
    std::vector<int> slots_;
};

class ReleasedLattice {
public:
    ReleasedLattice(const float* features, int d, int num_points) : N_(num_points), d_(d) {
        constexpr int lanes = 4;
        ShortKeyTable table(d, num_points);
        offset_.assign(static_cast<size_t>(d + 1) * (N_ + 16), 0);
        barycentric_.assign(static_cast<size_t>(d + 1) * (N_ + 16), 0.0f);
        // One aligned block for the per-lane vectors (std::vector<__m128> may be misaligned before C++17).
        __m128* block = static_cast<__m128*>(_mm_malloc((5 * d + 3) * sizeof(__m128), 16));
        __m128 *scale = block, *f = scale + d, *elevated = f + d, *rem0 = elevated + d + 1, *rank = rem0 + d + 1;
        std::vector<float> barycentric((d + 2) * lanes);
        std::vector<short> key(d + 1);
        const float inv_std_dev = std::sqrt(2.0 / 3.0) * (d + 1);
        for (int i = 0; i < d; ++i) scale[i] = _mm_set1_ps(1.0 / std::sqrt((i + 2) * (i + 1)) * inv_std_dev);
        const __m128 down = _mm_set1_ps(1.0f / (d + 1)), up = _mm_set1_ps(d + 1);
        const __m128 zero = _mm_set1_ps(0), one = _mm_set1_ps(1);

        for (int k = 0; k < N_; k += lanes) {
            float* lanes_f = reinterpret_cast<float*>(f);
            for (int j = 0; j < d; ++j)
                for (int i = 0; i < lanes; ++i) lanes_f[j * lanes + i] = k + i < N_ ? features[(k + i) * d + j] : 0.0f;
            __m128 sm = zero;
            for (int j = d; j > 0; --j) {
                const __m128 cf = _mm_mul_ps(f[j - 1], scale[j - 1]);
                elevated[j] = _mm_sub_ps(sm, _mm_mul_ps(_mm_set1_ps(j), cf));
                sm = _mm_add_ps(sm, cf);
            }
            elevated[0] = sm;
            __m128 sum = zero;
            for (int i = 0; i <= d; ++i) {
                const __m128 v = _mm_cvtepi32_ps(_mm_cvtps_epi32(_mm_mul_ps(down, elevated[i])));
                rem0[i] = _mm_mul_ps(v, up);
                sum = _mm_add_ps(sum, v);
            }
            for (int i = 0; i <= d; ++i) rank[i] = zero;
            for (int i = 0; i < d; ++i) {
                const __m128 di = _mm_sub_ps(elevated[i], rem0[i]);
                for (int j = i + 1; j <= d; ++j) {
                    const __m128 c = _mm_and_ps(one, _mm_cmplt_ps(di, _mm_sub_ps(elevated[j], rem0[j])));
                    rank[i] = _mm_add_ps(rank[i], c);
                    rank[j] = _mm_add_ps(rank[j], _mm_sub_ps(one, c));
                }
            }
            for (int i = 0; i <= d; ++i) {
                rank[i] = _mm_add_ps(rank[i], sum);
                const __m128 add = _mm_and_ps(up, _mm_cmplt_ps(rank[i], zero));
                const __m128 sub = _mm_and_ps(up, _mm_cmpge_ps(rank[i], up));
                rank[i] = _mm_add_ps(rank[i], _mm_sub_ps(add, sub));
                rem0[i] = _mm_add_ps(rem0[i], _mm_sub_ps(add, sub));
            }
            std::fill(barycentric.begin(), barycentric.end(), 0.0f);
            for (int i = 0; i <= d; ++i) {
                const __m128 v = _mm_mul_ps(_mm_sub_ps(elevated[i], rem0[i]), down);
                const float* fv = reinterpret_cast<const float*>(&v);
                const float* frank = reinterpret_cast<const float*>(&rank[i]);
                for (int j = 0; j < lanes; ++j) {
                    const int p = d - frank[j];
                    barycentric[j * (d + 2) + p] += fv[j];
                    barycentric[j * (d + 2) + p + 1] -= fv[j];
                }
            }
            const float* frank = reinterpret_cast<const float*>(rank);
            const float* frem0 = reinterpret_cast<const float*>(rem0);
            for (int j = 0; j < lanes; ++j) {
                barycentric[j * (d + 2)] += 1 + barycentric[j * (d + 2) + d + 1];
                for (int r = 0; r <= d; ++r) {
                    for (int i = 0; i < d; ++i) {
                        const int rk = static_cast<int>(frank[i * lanes + j]);
                        const short canonical = rk <= d - r ? r : r - (d + 1);
                        key[i] = static_cast<short>(frem0[i * lanes + j] + canonical);
                    }
                    offset_[(j + k) * (d + 1) + r] = table.find(key.data(), true);
                    barycentric_[(j + k) * (d + 1) + r] = barycentric[j * (d + 2) + r];
                }
            }
        }

        _mm_free(block);
        M_ = table.size();
        neighbours_.resize(static_cast<size_t>(d + 1) * M_ * 2);
        std::vector<short> n1(d + 1), n2(d + 1);
        for (int j = 0; j <= d; ++j) {
            for (int i = 0; i < M_; ++i) {
                const short* key = table.key(i);
                for (int k = 0; k < d; ++k) {
                    n1[k] = key[k] - 1;
                    n2[k] = key[k] + 1;
                }
                n1[j] = key[j] + d;
                n2[j] = key[j] - d;
                neighbours_[(static_cast<size_t>(j) * M_ + i) * 2] = table.find(n1.data(), false);
                neighbours_[(static_cast<size_t>(j) * M_ + i) * 2 + 1] = table.find(n2.data(), false);
            }
        }
    }

    // compute(out, in, value_size = 1) of the SSE branch: one __m128 per vertex, lane 0 used.
    void compute_one_channel(float* out, const float* in) const {
        const size_t vertices = static_cast<size_t>(M_) + 2;
        __m128* values = static_cast<__m128*>(_mm_malloc(vertices * sizeof(__m128), 16));
        __m128* new_values = static_cast<__m128*>(_mm_malloc(vertices * sizeof(__m128), 16));
        const __m128 zero = _mm_set1_ps(0);
        for (size_t i = 0; i < vertices; ++i) values[i] = new_values[i] = zero;
        __m128 value = zero;
        for (int i = 0; i < N_; ++i) {
            std::memcpy(&value, in + i, sizeof(float));
            for (int j = 0; j <= d_; ++j) {
                const int o = offset_[i * (d_ + 1) + j] + 1;
                values[o] = _mm_add_ps(values[o], _mm_mul_ps(_mm_set1_ps(barycentric_[i * (d_ + 1) + j]), value));
            }
        }
        const __m128 half = _mm_set1_ps(0.5f);
        for (int j = 0; j <= d_; ++j) {
            for (int i = 0; i < M_; ++i) {
                const int n1 = neighbours_[(static_cast<size_t>(j) * M_ + i) * 2] + 1;
                const int n2 = neighbours_[(static_cast<size_t>(j) * M_ + i) * 2 + 1] + 1;
                new_values[i + 1] = _mm_add_ps(values[i + 1], _mm_mul_ps(half, _mm_add_ps(values[n1], values[n2])));
            }
            std::swap(values, new_values);
        }
        const float alpha = 1.0f / (1 + powf(2, -d_));
        for (int i = 0; i < N_; ++i) {
            value = zero;
            for (int j = 0; j <= d_; ++j) {
                const int o = offset_[i * (d_ + 1) + j] + 1;
                value = _mm_add_ps(value, _mm_mul_ps(_mm_set1_ps(barycentric_[i * (d_ + 1) + j] * alpha), values[o]));
            }
            std::memcpy(out + i, &value, sizeof(float));
        }
        _mm_free(values);
        _mm_free(new_values);
    }

private:
    int N_, M_ = 0, d_;
    std::vector<int> offset_;
    std::vector<float> barycentric_;
    std::vector<int> neighbours_;
};

void released_filter_image(const float* image, const float* in, float* out, int K, int H, int W, float sigma_rgb,
                           float sigma_xy) {
    const int pixels = H * W;
    std::vector<float> features(static_cast<size_t>(pixels) * 5);
    for (int y = 0; y < H; ++y) {
        for (int x = 0; x < W; ++x) {
            const int p = y * W + x;
            features[p * 5 + 0] = float(x) / sigma_xy;
            features[p * 5 + 1] = float(y) / sigma_xy;
            for (int c = 0; c < 3; ++c) features[p * 5 + 2 + c] = float(image[c * pixels + p]) / sigma_rgb;
        }
    }
    const ReleasedLattice lattice(features.data(), 5, pixels);
    std::vector<float> channel_in(pixels), channel_out(pixels);
    for (int k = 0; k < K; ++k) {
        std::copy(in + static_cast<size_t>(k) * pixels, in + static_cast<size_t>(k + 1) * pixels, channel_in.begin());
        lattice.compute_one_channel(channel_out.data(), channel_in.data());
        std::copy(channel_out.begin(), channel_out.end(), out + static_cast<size_t>(k) * pixels);
    }
}

}  // namespace

extern "C" void released_bilateralfilter_batch(const float* images, const float* ins, float* outs, int N, int K, int H,
                                               int W, float sigma_rgb, float sigma_xy) {
    const int threads = omp_get_max_threads();
    omp_set_num_threads(std::min(threads, N));
#pragma omp parallel for
    for (int n = 0; n < N; ++n) {
        const size_t offset = static_cast<size_t>(n) * K * H * W;
        released_filter_image(images + static_cast<size_t>(n) * 3 * H * W, ins + offset, outs + offset, K, H, W,
                              sigma_rgb, sigma_xy);
    }
    // The released code leaves the process capped at N threads; undone so that the filter timed
    // next in the same process gets the default.
    omp_set_num_threads(threads);
}
