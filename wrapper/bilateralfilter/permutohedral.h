// Permutohedral lattice (Adams et al. 2010) with Kraehenbuehl's constants, for any feature
// dimension d. One lattice is built per set of points; filter() pushes any number of value
// channels through it in one pass. Every reduction is a gather in a fixed order, so results do
// not depend on the number of OpenMP threads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace permutohedral {

// Open-addressing table from lattice keys (d integers) to dense local vertex ids.
class VertexTable {
public:
    explicit VertexTable(int key_size);
    // Returns the id of key, adding it if new.
    int32_t insert(const int32_t* key, uint64_t hash);
    // Returns the id of key, or -1 if absent.
    int32_t find(const int32_t* key, uint64_t hash) const;
    int32_t size() const { return static_cast<int32_t>(hashes_.size()); }
    const int32_t* key(int32_t id) const { return keys_.data() + static_cast<size_t>(id) * key_size_; }

private:
    void grow();
    bool same_key(const int32_t* a, const int32_t* b) const;
    int key_size_;
    std::vector<int32_t> keys_;
    std::vector<uint64_t> hashes_;
    std::vector<int32_t> slots_;  // local id + 1; 0 = empty
    uint64_t mask_;
};

class Lattice {
public:
    // features: num_points rows of dim floats (already divided by their standard deviations).
    Lattice(const float* features, int dim, int64_t num_points);
    // values_in / values_out: channel-major (channels, num_points). Output is the unnormalised
    // Gaussian-weighted sum over all points (self included), written to values_out.
    void filter(const float* values_in, float* values_out, int channels) const;
    int64_t num_vertices() const { return num_vertices_; }

private:
    void splat(const float* point_values, float* vertex_values, int channels) const;
    void blur(float* vertex_values, float* scratch, int channels, float** result) const;
    void slice(const float* vertex_values, float* values_out, int channels) const;

    int dim_;
    int64_t num_points_;
    int64_t num_vertices_ = 0;
    // Per (point, remainder) entry: vertex index + 1 (0 never occurs) and barycentric weight.
    std::vector<int32_t> entry_vertex_;
    std::vector<float> entry_weight_;
    // CSR per vertex of its (point, weight) entries in point order (fixed summation order).
    std::vector<int64_t> vertex_entry_start_;
    std::vector<int32_t> vertex_points_;
    std::vector<float> vertex_weights_;
    // For axis j and vertex v: [(j * V + v) * 2 + 0/1] = neighbour index + 1, 0 = missing.
    std::vector<int32_t> blur_neighbours_;
};

}  // namespace permutohedral
