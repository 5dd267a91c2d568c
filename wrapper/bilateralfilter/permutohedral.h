// Permutohedral lattice (Adams et al. 2010) with Kraehenbuehl's constants, for feature dimensions
// 1..8, computing bit for bit what the released rloss/RRM filter computes on x86-64 (its SSE
// branch: round half to even, float rank and barycentric arithmetic, 16-bit vertex keys that wrap,
// splat and slice accumulated in point order, slice weights premultiplied by alpha).
//
// Built once per set of points; filter() pushes any number of value channels through it at once,
// a vertex's channels contiguous (in groups of up to 32) so splat, blur and slice run as vector
// operations.
// Inside an OpenMP team the neighbour search, blur and slice run in pieces as tasks that idle
// threads take; the inserts and the splat, whose order fixes the sums, stay on one thread.
// Memory: 8·(d+1) bytes per point (vertex and weight of each simplex vertex) and 8·(d+1) per
// vertex (blur neighbours); the build adds a hash table of 64–128 bytes of slots and 16–32 bytes
// of keys per vertex, filter() two vertex-value buffers of 4·(V+1)·C' bytes each (C' = channels
// rounded up to 8).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace permutohedral {

constexpr int kMaxDim = 8;

// A point's link to one vertex of its simplex: the vertex row (1-based; row 0 is the zero row)
// and the barycentric weight, side by side since splat and slice read both.
struct Entry {
    int32_t row;
    float weight;
};

class Lattice {
public:
    // features: dim planes of num_points floats each (already divided by their standard deviations).
    Lattice(const float* features, int dim, int64_t num_points);
    // values_in / values_out: channel-major (channels, num_points). Output is the unnormalised
    // Gaussian-weighted sum over all points (self included), written to values_out.
    void filter(const float* values_in, float* values_out, int channels) const;
    int64_t num_vertices() const { return num_vertices_; }

private:
    void splat(const float* values_in, float* vertex_values, int channels) const;
    void blur(float* vertex_values, float* scratch, int channels, float** result) const;
    void slice(const float* vertex_values, float* values_out, int channels) const;

    int dim_;
    int64_t num_points_;
    int64_t num_vertices_ = 0;
    // Per point, its d+1 simplex vertices r = 0..d.
    std::unique_ptr<Entry[]> entries_;
    // For axis j and vertex row v: [(j * (V + 1) + v) * 2 + 0/1] = neighbour row, 0 = missing.
    std::vector<int32_t> blur_neighbours_;
};

}  // namespace permutohedral
