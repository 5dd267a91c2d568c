#include "permutohedral.h"

// Vec8 helpers are always inlined into the cloned functions; their ABI never matters.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

// The hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time. They
// stay bit-identical across the three: the build passes -ffp-contract=off (no fused multiply-add)
// and every reduction keeps its order.
#if defined(__x86_64__) && defined(__linux__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define PERMUTOHEDRAL_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef PERMUTOHEDRAL_CLONES
#define PERMUTOHEDRAL_CLONES
#endif

namespace permutohedral {

namespace {

// Runs body(begin, end) over [0, count) in one piece per thread of the enclosing OpenMP team, as
// tasks (OpenMP 4.5) that the team's idle threads take: an image's parallel loops then use the
// threads other images leave free. Piece boundaries are multiples of `grain`; without a team, one
// piece.
template <class Body>
void for_each_piece(int64_t count, int64_t grain, const Body& body) {
#if defined(_OPENMP) && _OPENMP >= 201511
    const int pieces = omp_in_parallel() ? omp_get_num_threads() : 1;
    if (pieces > 1 && count > grain) {
        const Body* run = &body;
#pragma omp taskloop num_tasks(pieces) default(none) firstprivate(run, count, grain, pieces)
        for (int piece = 0; piece < pieces; ++piece) {
            (*run)(count * piece / pieces / grain * grain,
                   piece + 1 == pieces ? count : count * (piece + 1) / pieces / grain * grain);
        }
        return;
    }
#endif
    body(0, count);
}

// Points elevated together, one vector lane each (eight: native on AVX2, where sixteen lanes
// fell back to scalar code); a multiple of the released code's group of four.
constexpr int kBlock = 8;
constexpr int kReleasedGroup = 4;
// Points per tile when converting between channel-major and point-major layouts.
constexpr int64_t kTile = 64;
// Vertex values are stored with the channel count rounded up to this (one vector register).
constexpr int kLanes = 8;
// Channels splatted and sliced in one pass over the points (their sums stay in registers).
constexpr int kGroupChannels = 4 * kLanes;
// Vertex values are stored group by group: channels [first, first + group) of every vertex, in
// rows of group_width(group) floats, before the next group's, so splat and slice know the row size.
int group_size(int channels, int first) { return std::min(kGroupChannels, channels - first); }
int group_width(int group) { return (group + kLanes - 1) / kLanes * kLanes; }
// x + 1.5·2^23 − 1.5·2^23 rounds half to even, as _mm_cvtps_epi32 does, for |x| < 2^22.
constexpr float kRoundingShift = 12582912.0f;
constexpr int32_t kMaxRoundableBits = 0x4A800000;  // the bits of 2^22 as a float
// The vertex table is kept at most 1/16 full: nearly every lookup ends at its first slot, so its
// branches predict (half full was 15-30% slower on photographs).
constexpr int64_t kSlotsPerVertex = 16;

// A lattice point's d coordinates as 16-bit lanes (d <= 8), wrapping like the released `short` keys.
struct Key {
    uint64_t lo = 0, hi = 0;
    bool operator==(const Key& other) const { return lo == other.lo && hi == other.hi; }
};

// Fibonacci hashing: the top bits of a multiplicative mix pick the slot.
inline size_t slot_of(const Key& key, int shift) {
    return static_cast<size_t>((key.lo ^ key.hi * 0xC2B2AE3D27D4EB4FULL) * 0x9E3779B97F4A7C15ULL >> shift);
}

// Open-addressing table from keys to dense vertex ids in order of first insertion. Slots hold
// only id + 1 (0 = empty) so that the table stays in L2 at a low load; keys live by id.
class VertexTable {
public:
    // Inserts with the table's state held by value (in registers, once inlined into a loop that
    // copies it): `begin` made room for them, `end` records them. Between the two the table
    // itself must not be used.
    class Batch {
    public:
        // Returns the id of key, adding it if new.
        int32_t insert(const Key& key) {
            for (size_t slot = slot_of(key, shift_);; slot = (slot + 1) & mask_) {
                const uint32_t row = slots_[slot];
                if (row == 0) {
                    keys_[size_] = key;
                    slots_[slot] = static_cast<uint32_t>(++size_);
                    return size_ - 1;
                }
                if (keys_[row - 1] == key) return static_cast<int32_t>(row - 1);
            }
        }

    private:
        friend class VertexTable;
        uint32_t* slots_;
        Key* keys_;
        size_t mask_;
        int shift_;
        int32_t size_;
    };

    explicit VertexTable(int64_t expected_size) {
        int bits = 10;
        while ((int64_t{1} << bits) < kSlotsPerVertex * expected_size && bits < 31) ++bits;
        slots_.assign(size_t{1} << bits, 0);
        shift_ = 64 - bits;
    }

    // Room for `count` more keys, the table kept at most 1/kSlotsPerVertex full.
    Batch begin(int64_t count) {
        const size_t needed = static_cast<size_t>(size_ + count);
        while (needed * kSlotsPerVertex > slots_.size()) grow();
        if (keys_.size() < needed) keys_.resize(std::max(2 * keys_.size(), needed));
        Batch batch;
        batch.slots_ = slots_.data();
        batch.keys_ = keys_.data();
        batch.mask_ = slots_.size() - 1;
        batch.shift_ = shift_;
        batch.size_ = size_;
        return batch;
    }

    void end(const Batch& batch) { size_ = batch.size_; }

    // Returns the id of key, or -1 if absent.
    int32_t find(const Key& key) const {
        const size_t mask = slots_.size() - 1;
        for (size_t slot = slot_of(key, shift_); slots_[slot] != 0; slot = (slot + 1) & mask) {
            if (keys_[slots_[slot] - 1] == key) return static_cast<int32_t>(slots_[slot] - 1);
        }
        return -1;
    }

    int32_t size() const { return size_; }
    const Key& key(int32_t id) const { return keys_[id]; }

private:
    void grow() {
        slots_.assign(slots_.size() * 2, 0);
        --shift_;
        const size_t mask = slots_.size() - 1;
        for (int32_t id = 0; id < size_; ++id) {
            size_t slot = slot_of(keys_[id], shift_);
            while (slots_[slot] != 0) slot = (slot + 1) & mask;
            slots_[slot] = static_cast<uint32_t>(id + 1);
        }
    }

    std::vector<uint32_t> slots_;
    std::vector<Key> keys_;  // the first size_ are the vertices' keys
    int shift_;
    int32_t size_ = 0;
};

void set_lane(Key& key, int i, int value) {
    uint64_t& word = i < 4 ? key.lo : key.hi;
    const int shift = 16 * (i & 3);
    word = (word & ~(uint64_t{0xFFFF} << shift)) | (uint64_t{static_cast<uint16_t>(value)} << shift);
}

// Lane-wise sum of two keys modulo 2^16, without carries between lanes.
uint64_t add_lanes(uint64_t a, uint64_t b) {
    constexpr uint64_t kHigh = 0x8000800080008000ULL;
    return ((a & ~kHigh) + (b & ~kHigh)) ^ ((a ^ b) & kHigh);
}

Key add_lanes(const Key& a, const Key& b) { return Key{add_lanes(a.lo, b.lo), add_lanes(a.hi, b.hi)}; }

// Eight floats in one vector register (a pair of them without AVX), for the layout transposes.
typedef float Vec8 __attribute__((vector_size(32)));
#if defined(__clang__) || __GNUC__ >= 12
#define PERMUTOHEDRAL_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int Index8 __attribute__((vector_size(32)));
#define PERMUTOHEDRAL_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, Index8{__VA_ARGS__})
#endif

inline __attribute__((always_inline)) Vec8 load8(const float* from) {
    Vec8 v;
    std::memcpy(&v, from, sizeof v);
    return v;
}

inline __attribute__((always_inline)) void store8(float* to, const Vec8& v) { std::memcpy(to, &v, sizeof v); }

// In place: row i of the 8×8 block becomes column i (unpack, shuffle, then swap 128-bit halves).
inline __attribute__((always_inline)) void transpose8(Vec8 (&rows)[8]) {
    Vec8 pairs[8], quads[8];
    for (int i = 0; i < 8; i += 2) {
        pairs[i] = PERMUTOHEDRAL_SHUFFLE(rows[i], rows[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        pairs[i + 1] = PERMUTOHEDRAL_SHUFFLE(rows[i], rows[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4) {
        for (int h = 0; h < 2; ++h) {
            quads[i + 2 * h] = PERMUTOHEDRAL_SHUFFLE(pairs[i + h], pairs[i + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
            quads[i + 2 * h + 1] = PERMUTOHEDRAL_SHUFFLE(pairs[i + h], pairs[i + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    }
    for (int i = 0; i < 4; ++i) {
        rows[i] = PERMUTOHEDRAL_SHUFFLE(quads[i], quads[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        rows[i + 4] = PERMUTOHEDRAL_SHUFFLE(quads[i], quads[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}

// One lane per point of a block.
typedef float BlockFloat __attribute__((vector_size(32)));
typedef int32_t BlockInt __attribute__((vector_size(32)));
typedef uint32_t BlockWord __attribute__((vector_size(32)));
static_assert(kBlock * sizeof(float) == sizeof(BlockFloat), "a block is one vector per coordinate");

// The simplex of each point of a block: per simplex vertex r, its key as four 32-bit words of two
// 16-bit lanes each, and its barycentric weight.
struct BlockSimplices {
    BlockWord key[kMaxDim + 1][kMaxDim / 2];
    BlockFloat weight[kMaxDim + 1];

    Key key_of(int r, int b) const {
        return Key{key[r][0][b] | uint64_t{key[r][1][b]} << 32, key[r][2][b] | uint64_t{key[r][3][b]} << 32};
    }
};

// Elevates, rounds and ranks points [start, start + kBlock) of the (d, num_points) feature planes
// (Adams et al. 2010, in the released code's float arithmetic), one vector lane per point; points
// past the end have zero features. Returns false if a coordinate is too large to round exactly.
template <int d>
PERMUTOHEDRAL_CLONES bool simplices_of_block(const float* features, int64_t start, int64_t num_points,
                                             const float* scale, BlockSimplices& out) {
    const int64_t count = std::min<int64_t>(kBlock, num_points - start);
    BlockFloat elevated[d + 1], rem0[d + 1], remainder[d + 1];
    BlockFloat sm = {}, sum = {};
    for (int j = d; j > 0; --j) {
        BlockFloat feature = {};
        std::memcpy(&feature, features + (j - 1) * num_points + start, count * sizeof(float));
        const BlockFloat cf = feature * scale[j - 1];
        elevated[j] = sm - static_cast<float>(j) * cf;
        sm += cf;
    }
    elevated[0] = sm;
    BlockInt roundable = ~BlockInt{};
    for (int i = 0; i <= d; ++i) {
        const BlockFloat scaled = (1.0f / (d + 1)) * elevated[i];
        // |scaled| < 2^22 on the float's bits (a NaN fails too).
        BlockInt bits;
        std::memcpy(&bits, &scaled, sizeof bits);
        roundable &= (bits & 0x7FFFFFFF) < kMaxRoundableBits;
        const BlockFloat rounded = (scaled + kRoundingShift) - kRoundingShift;
        rem0[i] = rounded * static_cast<float>(d + 1);
        sum += rounded;
        remainder[i] = elevated[i] - rem0[i];
    }
    for (int b = 0; b < kBlock; ++b) {
        if (!roundable[b]) return false;
    }
    // rank[i] = position of coordinate i in the sort of the remainders: the released pairwise loop
    // (for i < j the smaller gets no count, ties go to j), counted per i. Comparisons give −1 / 0.
    const BlockInt zero = {};
    BlockInt rank[d + 1];
    for (int i = 0; i <= d; ++i) {
        rank[i] = zero + i;
        for (int j = 0; j < i; ++j) rank[i] += remainder[j] < remainder[i];
        for (int j = i + 1; j <= d; ++j) rank[i] -= remainder[i] < remainder[j];
    }
    // Bring points with a nonzero coordinate sum back onto the plane.
    const BlockInt total = __builtin_convertvector(sum, BlockInt);
    // Selections are masks (−1 / 0) and bit operations: vector ?: becomes branches on AVX2.
    for (int i = 0; i <= d; ++i) {
        const BlockInt r = rank[i] + total;
        const BlockInt shift = ((r < 0) & (d + 1)) | ((r > d) & -(d + 1));
        rank[i] = r + shift;
        rem0[i] += __builtin_convertvector(shift, BlockFloat);
    }
    // by_rank[k] = (elevated − rem0)/(d+1) of the coordinate with rank k (one per point).
    BlockInt by_rank_bits[d + 1] = {};
    for (int i = 0; i <= d; ++i) {
        const BlockFloat v = (elevated[i] - rem0[i]) * (1.0f / (d + 1));
        BlockInt bits;
        std::memcpy(&bits, &v, sizeof bits);
        for (int k = 0; k <= d; ++k) by_rank_bits[k] |= bits & (rank[i] == k);
    }
    BlockFloat by_rank[d + 1];
    std::memcpy(by_rank, by_rank_bits, sizeof by_rank);
    // The released loop adds v to slot d − rank and subtracts it from slot d − rank + 1, starting
    // from zero; slot d+1 wraps onto slot 0. Written per slot, in the same float operations.
    const BlockFloat none = {};
    out.weight[0] = (none + by_rank[d]) + (1.0f + (none - by_rank[0]));
    for (int r = 1; r <= d; ++r) out.weight[r] = (none + by_rank[d - r]) - by_rank[d - r + 1];
    // Vertex r of the canonical simplex: coordinate r where rank <= d − r, else r − (d+1); each
    // coordinate goes into a 16-bit lane of the key.
    BlockInt base[d];
    for (int i = 0; i < d; ++i) base[i] = __builtin_convertvector(rem0[i], BlockInt);
    for (int r = 0; r <= d; ++r) {
        for (int w = 0; w < kMaxDim / 2; ++w) out.key[r][w] = BlockWord{};
        for (int i = 0; i < d; ++i) {
            const BlockInt coordinate = base[i] + r - ((rank[i] > d - r) & (d + 1));
            out.key[r][i / 2] |= (__builtin_convertvector(coordinate, BlockWord) & 0xFFFF) << (16 * (i & 1));
        }
    }
    return true;
}

// One [1 2 1]/2 blur step of vertex rows [first, last) of 8·chunks floats along one axis.
template <int chunks>
PERMUTOHEDRAL_CLONES void blur_axis(const float* old_values, float* new_values, const int32_t* neighbours,
                                    int64_t first, int64_t last) {
    constexpr int width = chunks * kLanes;
    for (int64_t v = first; v < last; ++v) {
        const float* n1 = old_values + static_cast<int64_t>(neighbours[2 * v]) * width;
        const float* n2 = old_values + static_cast<int64_t>(neighbours[2 * v + 1]) * width;
        const float* old_v = old_values + v * width;
        for (int c = 0; c < width; c += kLanes) {
            store8(new_values + v * width + c, load8(old_v + c) + 0.5f * (load8(n1 + c) + load8(n2 + c)));
        }
    }
}

// Copies channels [0, channels) of points [start, start + count) into the point-major tile (rows
// of `width` floats; channels past `channels` are zero), 8×8 blocks at a time.
inline __attribute__((always_inline)) void to_point_major(const float* values, int64_t num_points, int64_t start,
                                                          int64_t count, int channels, int width, float* tile) {
    const int64_t whole = count / kLanes * kLanes;
    for (int c = 0; c < width; c += kLanes) {
        for (int64_t p = 0; p < whole; p += kLanes) {
            Vec8 rows[kLanes] = {};
            for (int k = 0; k < kLanes && c + k < channels; ++k) rows[k] = load8(values + (c + k) * num_points + start + p);
            transpose8(rows);
            for (int q = 0; q < kLanes; ++q) store8(tile + (p + q) * width + c, rows[q]);
        }
    }
    for (int64_t p = whole; p < count; ++p) {
        for (int k = 0; k < width; ++k) tile[p * width + k] = k < channels ? values[k * num_points + start + p] : 0.0f;
    }
}

// The inverse of to_point_major for channels [0, channels).
inline __attribute__((always_inline)) void from_point_major(const float* tile, int64_t num_points, int64_t start,
                                                            int64_t count, int channels, int width, float* values) {
    const int64_t whole = count / kLanes * kLanes;
    for (int c = 0; c < channels; c += kLanes) {
        for (int64_t p = 0; p < whole; p += kLanes) {
            Vec8 rows[kLanes];
            for (int q = 0; q < kLanes; ++q) rows[q] = load8(tile + (p + q) * width + c);
            transpose8(rows);
            for (int k = 0; k < kLanes && c + k < channels; ++k) store8(values + (c + k) * num_points + start + p, rows[k]);
        }
    }
    for (int64_t p = whole; p < count; ++p) {
        for (int k = 0; k < channels; ++k) values[k * num_points + start + p] = tile[p * width + k];
    }
}

// What splat and slice need of the lattice.
struct Entries {
    const Entry* entry;  // (num_points, d + 1)
    int64_t num_points;
};

// Splats `channels` (<= 8·chunks) channel-major value planes into vertex rows of 8·chunks
// floats, every vertex summing its points in point order. The chunks of a point stay in registers.
template <int d, int chunks>
PERMUTOHEDRAL_CLONES void splat_group(const Entries& entries, const float* values, int channels, float* vertex_values) {
    constexpr int width = chunks * kLanes;
    float tile[kTile * width];
    for (int64_t start = 0; start < entries.num_points; start += kTile) {
        const int64_t count = std::min(kTile, entries.num_points - start);
        to_point_major(values, entries.num_points, start, count, channels, width, tile);
        for (int64_t p = 0; p < count; ++p) {
            Vec8 value[chunks];
            for (int c = 0; c < chunks; ++c) value[c] = load8(tile + p * width + c * kLanes);
            for (int r = 0; r <= d; ++r) {
                const int64_t e = (start + p) * (d + 1) + r;
                const float w = entries.entry[e].weight;
                float* row = vertex_values + static_cast<int64_t>(entries.entry[e].row) * width;
                for (int c = 0; c < chunks; ++c) store8(row + c * kLanes, load8(row + c * kLanes) + w * value[c]);
            }
        }
    }
}

// Slices channels [0, channels) of vertex rows of 8·chunks floats back to channel-major planes:
// per point the sum over its simplex vertices r = 0..d of (weight·alpha)·row, from zero, in the
// released order.
template <int d, int chunks>
PERMUTOHEDRAL_CLONES void slice_group(const Entries& entries, int64_t first, int64_t last, const float* vertex_values,
                                      int channels, float alpha, float* values) {
    constexpr int width = chunks * kLanes;
    float tile[kTile * width];
    for (int64_t start = first; start < last; start += kTile) {
        const int64_t count = std::min(kTile, last - start);
        for (int64_t p = 0; p < count; ++p) {
            Vec8 acc[chunks] = {};
            for (int r = 0; r <= d; ++r) {
                const int64_t e = (start + p) * (d + 1) + r;
                const float w = entries.entry[e].weight * alpha;
                const float* row = vertex_values + static_cast<int64_t>(entries.entry[e].row) * width;
                for (int c = 0; c < chunks; ++c) acc[c] += w * load8(row + c * kLanes);
            }
            for (int c = 0; c < chunks; ++c) store8(tile + p * width + c * kLanes, acc[c]);
        }
        from_point_major(tile, entries.num_points, start, count, channels, width, values);
    }
}

// Links the `count` points of a block to their simplex vertices (entries: (count, d + 1)), in
// point order; d known at compile time, so the d + 1 inserts of a point unroll.
template <int d>
void link_block(const BlockSimplices& block, int count, VertexTable::Batch& inserts, Entry* entries) {
    VertexTable::Batch local = inserts;
    for (int b = 0; b < count; ++b) {
        for (int r = 0; r <= d; ++r) {
            entries[b * (d + 1) + r] = Entry{local.insert(block.key_of(r, b)) + 1, block.weight[r][b]};
        }
    }
    inserts = local;
}

using SimplicesFunction = bool (*)(const float*, int64_t, int64_t, const float*, BlockSimplices&);
const SimplicesFunction kSimplices[kMaxDim] = {
    simplices_of_block<1>, simplices_of_block<2>, simplices_of_block<3>, simplices_of_block<4>,
    simplices_of_block<5>, simplices_of_block<6>, simplices_of_block<7>, simplices_of_block<8>};
using LinkFunction = void (*)(const BlockSimplices&, int, VertexTable::Batch&, Entry*);
const LinkFunction kLink[kMaxDim] = {link_block<1>, link_block<2>, link_block<3>, link_block<4>,
                                     link_block<5>, link_block<6>, link_block<7>, link_block<8>};
using BlurFunction = void (*)(const float*, float*, const int32_t*, int64_t, int64_t);
const BlurFunction kBlur[4] = {blur_axis<1>, blur_axis<2>, blur_axis<3>, blur_axis<4>};
using SplatFunction = void (*)(const Entries&, const float*, int, float*);
using SliceFunction = void (*)(const Entries&, int64_t, int64_t, const float*, int, float, float*);
// Kernels by feature dimension (1..kMaxDim) and, for splat and slice, registers per channel group
// (1..4): the loops over coordinates, simplex vertices and channels unroll.
#define PERMUTOHEDRAL_BY_CHUNKS(kernel, d) {kernel<d, 1>, kernel<d, 2>, kernel<d, 3>, kernel<d, 4>}
#define PERMUTOHEDRAL_BY_DIM(kernel)                                                                  \
    {PERMUTOHEDRAL_BY_CHUNKS(kernel, 1), PERMUTOHEDRAL_BY_CHUNKS(kernel, 2), PERMUTOHEDRAL_BY_CHUNKS(kernel, 3), \
     PERMUTOHEDRAL_BY_CHUNKS(kernel, 4), PERMUTOHEDRAL_BY_CHUNKS(kernel, 5), PERMUTOHEDRAL_BY_CHUNKS(kernel, 6), \
     PERMUTOHEDRAL_BY_CHUNKS(kernel, 7), PERMUTOHEDRAL_BY_CHUNKS(kernel, 8)}
const SplatFunction kSplat[kMaxDim][4] = PERMUTOHEDRAL_BY_DIM(splat_group);
const SliceFunction kSlice[kMaxDim][4] = PERMUTOHEDRAL_BY_DIM(slice_group);
#undef PERMUTOHEDRAL_BY_DIM
#undef PERMUTOHEDRAL_BY_CHUNKS

}  // namespace

Lattice::Lattice(const float* features, int dim, int64_t num_points) : dim_(dim), num_points_(num_points) {
    if (dim < 1 || dim > kMaxDim) {
        throw std::invalid_argument("lattice feature dimension must be 1.." + std::to_string(kMaxDim) + ", got " +
                                    std::to_string(dim));
    }
    const int d = dim;
    const int64_t num_entries = num_points * (d + 1);
    if (num_entries >= std::numeric_limits<int32_t>::max()) {
        throw std::invalid_argument("too many points for the lattice");
    }
    // Every entry is written below: no zero fill.
    entries_.reset(new Entry[num_entries]);

    // Constants and float/double mix of Kraehenbuehl's permutohedral.cpp (SSE branch), for parity.
    const float inv_std_dev = std::sqrt(2.0 / 3.0) * (d + 1);
    float scale[kMaxDim];
    for (int i = 0; i < d; ++i) scale[i] = 1.0 / std::sqrt(double((i + 2) * (i + 1))) * inv_std_dev;

    // Photographs give far fewer vertices than points; the table grows when needed.
    VertexTable table(num_points / 16 + 64);
    const SimplicesFunction simplices = kSimplices[d - 1];
    const LinkFunction link = kLink[d - 1];
    BlockSimplices block;
    for (int64_t start = 0; start < num_points; start += kBlock) {
        if (!simplices(features, start, num_points, scale, block)) {
            throw std::invalid_argument("lattice features are too large (a scaled coordinate reaches 2^22)");
        }
        const int count = static_cast<int>(std::min<int64_t>(kBlock, num_points - start));
        VertexTable::Batch inserts = table.begin(static_cast<int64_t>(kBlock) * (d + 1));  // padding lanes too
        link(block, count, inserts, entries_.get() + start * (d + 1));
        // The released code elevates points four at a time and also inserts the simplex of the
        // zero-feature lanes that pad the last group: empty vertices that still relay the blur.
        if (count < kBlock && num_points % kReleasedGroup != 0) {
            for (int r = 0; r <= d; ++r) inserts.insert(block.key_of(r, count));
        }
        table.end(inserts);
    }
    num_vertices_ = table.size();
    const int64_t rows = num_vertices_ + 1;

    // Blur neighbours along each of the d+1 axes: n1 = key − 1 everywhere, + d on axis j (axis d
    // touches no stored coordinate); n2 is the inverse step, so one lookup finds both. A missing
    // n1 (row 0) sends its inverse to a scratch int: no branch mispredicts, and pieces on other
    // threads never write the same place.
    blur_neighbours_.assign(static_cast<size_t>(d + 1) * rows * 2, 0);
    for (int j = 0; j <= d; ++j) {
        Key step;
        for (int i = 0; i < d; ++i) set_lane(step, i, i == j ? d : -1);
        int32_t* axis = blur_neighbours_.data() + static_cast<size_t>(j) * rows * 2;
        for_each_piece(num_vertices_, 1, [&](int64_t first, int64_t last) {
            int32_t unused;
            for (int64_t v = first; v < last; ++v) {
                const int32_t n1 = table.find(add_lanes(table.key(static_cast<int32_t>(v)), step)) + 1;
                axis[2 * (v + 1)] = n1;
                *(n1 != 0 ? &axis[2 * n1 + 1] : &unused) = static_cast<int32_t>(v + 1);
            }
        });
    }
}

void Lattice::splat(const float* values_in, float* vertex_values, int channels) const {
    const Entries entries{entries_.get(), num_points_};
    for (int first = 0; first < channels; first += kGroupChannels) {
        const int group = group_size(channels, first);
        kSplat[dim_ - 1][(group - 1) / kLanes](entries, values_in + first * num_points_, group,
                                              vertex_values + (num_vertices_ + 1) * first);
    }
}

void Lattice::blur(float* vertex_values, float* scratch, int channels, float** result) const {
    const int64_t rows = num_vertices_ + 1;
    float* old_values = vertex_values;
    float* new_values = scratch;
    for (int j = 0; j <= dim_; ++j) {
        const int32_t* neighbours = blur_neighbours_.data() + static_cast<size_t>(j) * rows * 2;
        for_each_piece(num_vertices_, 1, [&](int64_t first, int64_t last) {
            for (int group_first = 0; group_first < channels; group_first += kGroupChannels) {
                const int64_t offset = rows * group_first;
                kBlur[(group_size(channels, group_first) - 1) / kLanes](old_values + offset, new_values + offset,
                                                                        neighbours, first + 1, last + 1);
            }
        });
        std::swap(old_values, new_values);
    }
    *result = old_values;
}

void Lattice::slice(const float* vertex_values, float* values_out, int channels) const {
    const float alpha = 1.0f / (1 + std::pow(2.0f, static_cast<float>(-dim_)));
    const Entries entries{entries_.get(), num_points_};
    for (int first = 0; first < channels; first += kGroupChannels) {
        const int group = group_size(channels, first);
        const SliceFunction slice_points = kSlice[dim_ - 1][(group - 1) / kLanes];
        const float* group_values = vertex_values + (num_vertices_ + 1) * first;
        for_each_piece(num_points_, kTile, [&](int64_t begin, int64_t end) {
            slice_points(entries, begin, end, group_values, group, alpha, values_out + first * num_points_);
        });
    }
}

void Lattice::filter(const float* values_in, float* values_out, int channels) const {
    if (channels < 1) throw std::invalid_argument("number of channels must be >= 1");
    const int64_t rows = num_vertices_ + 1;
    const size_t size = static_cast<size_t>(rows) * group_width(channels);  // every group full but the last
    // Splat sums from zero; the blur writes every row of the scratch buffer but row 0 of each
    // group, the zero row that missing neighbours point to.
    std::vector<float> vertex_values(size, 0.0f);
    std::unique_ptr<float[]> scratch(new float[size]);
    for (int first = 0; first < channels; first += kGroupChannels) {
        std::fill_n(scratch.get() + rows * first, group_width(group_size(channels, first)), 0.0f);
    }
    splat(values_in, vertex_values.data(), channels);
    float* blurred = nullptr;
    blur(vertex_values.data(), scratch.get(), channels, &blurred);
    slice(blurred, values_out, channels);
}

}  // namespace permutohedral
