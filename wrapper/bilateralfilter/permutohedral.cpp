#include "permutohedral.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace permutohedral {

namespace {

int thread_index() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

int team_size() {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

// Below this many points a thread team costs more than it saves.
constexpr int64_t kMinPointsForThreads = 8192;

int available_threads(int64_t num_points) {
#ifdef _OPENMP
    // Inside an outer parallel region (batch over images) nested regions run on one thread.
    if (num_points < kMinPointsForThreads || omp_in_parallel()) return 1;
    return omp_get_max_threads();
#else
    (void)num_points;
    return 1;
#endif
}

uint64_t hash_key(const int32_t* key, int key_size) {
    uint64_t h = 0;
    for (int i = 0; i < key_size; ++i) {
        h = (h + static_cast<uint32_t>(key[i])) * 0x9E3779B97F4A7C15ULL;
    }
    // splitmix64 finaliser: low bits pick the slot, high bits the partition.
    h ^= h >> 31;
    h *= 0xBF58476D1CE4E5B9ULL;
    h ^= h >> 27;
    h *= 0x94D049BB133111EBULL;
    h ^= h >> 31;
    return h;
}

int partition_of(uint64_t hash, int partitions) {
    return static_cast<int>((hash >> 40) % static_cast<uint64_t>(partitions));
}

// Points per tile when converting between channel-major and point-major layouts.
constexpr int64_t kTile = 256;

}  // namespace

bool VertexTable::same_key(const int32_t* a, const int32_t* b) const {
    for (int i = 0; i < key_size_; ++i) {
        if (a[i] != b[i]) return false;
    }
    return true;
}

VertexTable::VertexTable(int key_size) : key_size_(key_size), slots_(1024, 0), mask_(1023) {}

int32_t VertexTable::find(const int32_t* key, uint64_t hash) const {
    for (uint64_t slot = hash & mask_;; slot = (slot + 1) & mask_) {
        const int32_t stored = slots_[slot];
        if (stored == 0) return -1;
        const int32_t id = stored - 1;
        if (hashes_[id] == hash && same_key(key, this->key(id))) return id;
    }
}

int32_t VertexTable::insert(const int32_t* key, uint64_t hash) {
    if ((hashes_.size() + 1) * 2 > slots_.size()) grow();
    for (uint64_t slot = hash & mask_;; slot = (slot + 1) & mask_) {
        const int32_t stored = slots_[slot];
        if (stored == 0) {
            const int32_t id = size();
            keys_.insert(keys_.end(), key, key + key_size_);
            hashes_.push_back(hash);
            slots_[slot] = id + 1;
            return id;
        }
        const int32_t id = stored - 1;
        if (hashes_[id] == hash && same_key(key, this->key(id))) return id;
    }
}

void VertexTable::grow() {
    slots_.assign(slots_.size() * 2, 0);
    mask_ = slots_.size() - 1;
    for (int32_t id = 0; id < size(); ++id) {
        uint64_t slot = hashes_[id] & mask_;
        while (slots_[slot] != 0) slot = (slot + 1) & mask_;
        slots_[slot] = id + 1;
    }
}

Lattice::Lattice(const float* features, int dim, int64_t num_points)
    : dim_(dim), num_points_(num_points) {
    if (dim < 1) throw std::invalid_argument("lattice feature dimension must be >= 1");
    const int d = dim;
    const int64_t num_entries = num_points * (d + 1);
    if (num_entries >= std::numeric_limits<int32_t>::max()) {
        throw std::invalid_argument("too many points for the lattice");
    }
    entry_vertex_.assign(num_entries, 0);
    entry_weight_.assign(num_entries, 0.0f);
    std::vector<int32_t> entry_keys(num_entries * d);
    std::vector<uint64_t> entry_hashes(num_entries);

    // Constants and float/double mix as in Kraehenbuehl's permutohedral.cpp, for parity.
    const float inv_std_dev = std::sqrt(2.0 / 3.0) * (d + 1);
    std::vector<float> scale(d);
    for (int i = 0; i < d; ++i) scale[i] = 1.0 / std::sqrt(double((i + 2) * (i + 1))) * inv_std_dev;
    const float down_factor = 1.0f / (d + 1);
    const float up_factor = static_cast<float>(d + 1);
    const int threads = available_threads(num_points);

    // 1. Elevate every point, find its simplex, barycentric weights and vertex keys.
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> elevated(d + 1), rem0(d + 1), barycentric(d + 2);
        std::vector<int> rank(d + 1);
#pragma omp for schedule(static)
        for (int64_t p = 0; p < num_points; ++p) {
            const float* f = features + p * d;
            float sm = 0;
            for (int j = d; j > 0; --j) {
                const float cf = f[j - 1] * scale[j - 1];
                elevated[j] = sm - j * cf;
                sm += cf;
            }
            elevated[0] = sm;

            int sum = 0;
            for (int i = 0; i <= d; ++i) {
                const int rd = static_cast<int>(std::round(down_factor * elevated[i]));
                rem0[i] = rd * up_factor;
                sum += rd;
            }
            std::fill(rank.begin(), rank.end(), 0);
            for (int i = 0; i < d; ++i) {
                const double di = elevated[i] - rem0[i];
                for (int j = i + 1; j <= d; ++j) {
                    if (di < elevated[j] - rem0[j]) {
                        ++rank[i];
                    } else {
                        ++rank[j];
                    }
                }
            }
            for (int i = 0; i <= d; ++i) {
                rank[i] += sum;
                if (rank[i] < 0) {
                    rank[i] += d + 1;
                    rem0[i] += d + 1;
                } else if (rank[i] > d) {
                    rank[i] -= d + 1;
                    rem0[i] -= d + 1;
                }
            }
            std::fill(barycentric.begin(), barycentric.end(), 0.0f);
            for (int i = 0; i <= d; ++i) {
                const float v = (elevated[i] - rem0[i]) * down_factor;
                barycentric[d - rank[i]] += v;
                barycentric[d - rank[i] + 1] -= v;
            }
            barycentric[0] += 1.0 + barycentric[d + 1];

            for (int r = 0; r <= d; ++r) {
                const int64_t entry = p * (d + 1) + r;
                int32_t* key = entry_keys.data() + entry * d;
                for (int i = 0; i < d; ++i) {
                    // canonical simplex vertex r: coordinate r where rank <= d - r, else r - (d+1)
                    const int canonical = rank[i] <= d - r ? r : r - (d + 1);
                    key[i] = static_cast<int32_t>(rem0[i]) + canonical;
                }
                entry_hashes[entry] = hash_key(key, d);
                entry_weight_[entry] = barycentric[r];
            }
        }
    }

    // 2. Deduplicate vertices: each thread owns the keys of one hash partition.
    std::vector<VertexTable> tables;
    std::vector<int32_t> local_id(num_entries);
    int partitions = 1;
#pragma omp parallel num_threads(threads)
    {
#pragma omp single
        {
            partitions = team_size();
            tables.assign(partitions, VertexTable(d));
        }
        const int own = thread_index();
        VertexTable& table = tables[own];
        for (int64_t e = 0; e < num_entries; ++e) {
            if (partition_of(entry_hashes[e], partitions) == own) {
                local_id[e] = table.insert(entry_keys.data() + e * d, entry_hashes[e]);
            }
        }
    }
    std::vector<int64_t> partition_start(partitions + 1, 0);
    for (int t = 0; t < partitions; ++t) partition_start[t + 1] = partition_start[t] + tables[t].size();
    num_vertices_ = partition_start[partitions];
    const int64_t V = num_vertices_;

#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t e = 0; e < num_entries; ++e) {
        entry_vertex_[e] = static_cast<int32_t>(
            partition_start[partition_of(entry_hashes[e], partitions)] + local_id[e] + 1);
    }

    // 3. Splat gather lists: entries of each vertex in point order.
    vertex_entry_start_.assign(V + 2, 0);
    for (int64_t e = 0; e < num_entries; ++e) ++vertex_entry_start_[entry_vertex_[e] + 1];
    for (int64_t v = 1; v <= V + 1; ++v) vertex_entry_start_[v] += vertex_entry_start_[v - 1];
    vertex_points_.resize(num_entries);
    vertex_weights_.resize(num_entries);
    {
        std::vector<int64_t> fill(vertex_entry_start_.begin(), vertex_entry_start_.end() - 1);
        for (int64_t e = 0; e < num_entries; ++e) {
            const int64_t at = fill[entry_vertex_[e]]++;
            vertex_points_[at] = static_cast<int32_t>(e / (d + 1));
            vertex_weights_[at] = entry_weight_[e];
        }
    }

    // 4. Blur neighbours along each of the d+1 lattice axes.
    blur_neighbours_.assign(static_cast<size_t>(d + 1) * V * 2, 0);
#pragma omp parallel num_threads(threads)
    {
        std::vector<int32_t> n1(d + 1), n2(d + 1);
        auto lookup = [&](const int32_t* key) -> int32_t {
            const uint64_t h = hash_key(key, d);
            const int part = partition_of(h, partitions);
            const int32_t id = tables[part].find(key, h);
            return id < 0 ? 0 : static_cast<int32_t>(partition_start[part] + id + 1);
        };
#pragma omp for schedule(dynamic, 1024)
        for (int64_t v = 0; v < V; ++v) {
            const int part = static_cast<int>(
                std::upper_bound(partition_start.begin(), partition_start.end(), v) - partition_start.begin() - 1);
            const int32_t* key = tables[part].key(static_cast<int32_t>(v - partition_start[part]));
            for (int j = 0; j <= d; ++j) {
                for (int k = 0; k < d; ++k) {
                    n1[k] = key[k] - 1;
                    n2[k] = key[k] + 1;
                }
                // n1/n2 have d+1 slots, so j = d touches no key coordinate.
                n1[j] = (j < d ? key[j] : 0) + d;
                n2[j] = (j < d ? key[j] : 0) - d;
                const size_t at = (static_cast<size_t>(j) * V + v) * 2;
                blur_neighbours_[at] = lookup(n1.data());
                blur_neighbours_[at + 1] = lookup(n2.data());
            }
        }
    }
}

void Lattice::splat(const float* point_values, float* vertex_values, int channels) const {
    const int threads = available_threads(num_points_);
    std::fill(vertex_values, vertex_values + channels, 0.0f);  // slot 0: missing neighbour
#pragma omp parallel for schedule(dynamic, 256) num_threads(threads)
    for (int64_t v = 1; v <= num_vertices_; ++v) {
        float* acc = vertex_values + v * channels;
        std::fill(acc, acc + channels, 0.0f);
        for (int64_t i = vertex_entry_start_[v]; i < vertex_entry_start_[v + 1]; ++i) {
            const float w = vertex_weights_[i];
            const float* in = point_values + static_cast<int64_t>(vertex_points_[i]) * channels;
            for (int k = 0; k < channels; ++k) acc[k] += w * in[k];
        }
    }
}

void Lattice::blur(float* vertex_values, float* scratch, int channels, float** result) const {
    const int threads = available_threads(num_points_);
    const int64_t V = num_vertices_;
    std::fill(scratch, scratch + channels, 0.0f);
    float* old_values = vertex_values;
    float* new_values = scratch;
    for (int j = 0; j <= dim_; ++j) {
        const int32_t* neighbours = blur_neighbours_.data() + static_cast<size_t>(j) * V * 2;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t v = 0; v < V; ++v) {
            const float* old_v = old_values + (v + 1) * channels;
            const float* n1 = old_values + static_cast<int64_t>(neighbours[2 * v]) * channels;
            const float* n2 = old_values + static_cast<int64_t>(neighbours[2 * v + 1]) * channels;
            float* new_v = new_values + (v + 1) * channels;
            for (int k = 0; k < channels; ++k) new_v[k] = old_v[k] + 0.5f * (n1[k] + n2[k]);
        }
        std::swap(old_values, new_values);
    }
    *result = old_values;
}

void Lattice::slice(const float* vertex_values, float* values_out, int channels) const {
    const int threads = available_threads(num_points_);
    const int d = dim_;
    const float alpha = 1.0f / (1 + std::pow(2.0f, static_cast<float>(-d)));
    const int64_t N = num_points_;
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> tile(kTile * channels);
#pragma omp for schedule(static)
        for (int64_t start = 0; start < N; start += kTile) {
            const int64_t count = std::min(kTile, N - start);
            std::fill(tile.begin(), tile.end(), 0.0f);
            for (int64_t p = 0; p < count; ++p) {
                float* acc = tile.data() + p * channels;
                for (int r = 0; r <= d; ++r) {
                    const int64_t e = (start + p) * (d + 1) + r;
                    const float w = entry_weight_[e];
                    const float* val = vertex_values + static_cast<int64_t>(entry_vertex_[e]) * channels;
                    for (int k = 0; k < channels; ++k) acc[k] += w * val[k] * alpha;
                }
            }
            for (int k = 0; k < channels; ++k) {
                float* out = values_out + k * N + start;
                for (int64_t p = 0; p < count; ++p) out[p] = tile[p * channels + k];
            }
        }
    }
}

void Lattice::filter(const float* values_in, float* values_out, int channels) const {
    if (channels < 1) throw std::invalid_argument("number of channels must be >= 1");
    const int threads = available_threads(num_points_);
    const int64_t N = num_points_;
    const int64_t C = channels;
    // Point-major copy so that splatting reads each point's channels contiguously.
    std::vector<float> point_values(N * C);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t start = 0; start < N; start += kTile) {
        const int64_t end = std::min(start + kTile, N);
        for (int64_t k = 0; k < C; ++k) {
            const float* in = values_in + k * N;
            for (int64_t p = start; p < end; ++p) point_values[p * C + k] = in[p];
        }
    }
    std::vector<float> vertex_values((num_vertices_ + 1) * C), scratch((num_vertices_ + 1) * C);
    splat(point_values.data(), vertex_values.data(), channels);
    float* blurred = nullptr;
    blur(vertex_values.data(), scratch.data(), channels, &blurred);
    slice(blurred, values_out, channels);
}

}  // namespace permutohedral
