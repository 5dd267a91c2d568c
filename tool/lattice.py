"""Permutohedral lattice (Adams et al. 2010, Krähenbühl's constants) in PyTorch tensor ops.

Built once from per-pixel features of any dimension d, it filters any number of value channels at
once: out_i ≈ Σ_j exp(−½‖f_i − f_j‖²)·v_j over the points of each image, self included (the
lattice's approximation of that Gaussian, computed as the C++ codes compute it). A batch of
images is one build; vertices of different images never merge. Everything runs on the inputs'
device in float32.

Two layouts (`static_shapes`, default True on CUDA, False on the CPU), same results:
  static   no host–device synchronisation (no `.item()`, `unique`, `nonzero`, boolean masks or
           other data-dependent shapes): vertex arrays are sized by the upper bound B·N'·(d+1)
           (N' = N, plus one when N % 4 != 0, see below), splat by `index_add_` r by r, blur and
           slice by gathers. A vertex is vertex r of every simplex it is in (its coordinates are
           ≡ r mod d+1), so each vertex sums its points in point order and the slice sums r = 0..d:
           the C++ order (bit-equal to the released filter on the CPU; CUDA's atomics reorder).
  compact  (CPU) reads the vertex count back (free there), sizes vertex arrays exactly, packs
           vertex keys by the coordinates' actual range, and splats/slices as sparse CSR products
           (MKL; sums in its order, a few float32 ulps from the C++).

Arithmetic flavours (`flavour`):
  "rrm"       the released rloss/RRM bilateral filter (`wrapper/bilateralfilter/permutohedral.cpp`,
              front end `tool.bilateral.bilateral_filter`);
  "densecrf"  Krähenbühl's densecrf `permutohedral.cpp` as compiled into pydensecrf (SSE branch).
Both build the same lattice, operation for operation: scale factors (float/double mix), elevation,
round half to even, float rank (ties to the later coordinate), barycentric weights with the 0-th
weight wrapped (w0 = b[0] + (1 + b[d+1])), 16-bit vertex keys that wrap, and the vertices of the
zero-feature lanes that pad the last group of four points when N % 4 != 0 (empty vertices that
still relay the blur). Both blur new = old + 0.5·(n1 + n2) along axes 0..d, a missing neighbour
giving 0, and slice with alpha = 1/(1 + 2^−d). They differ only where densecrf filters at most
two channels in one call (`seqCompute`): it slices Σ (w·v)·alpha instead of Σ (w·alpha)·v, and
blurs in double (which rounds to the same floats). `filter(value_size=...)` says which channel
count densecrf would see (the static layout honours it; the compact one sums in MKL's order).

Memory per image (N points, N' padded, d features, K channels, R vertex rows; R = N'·(d+1) + 1 on
the static layout, the true vertex count + 1 (typically 1–10% of that) on the compact one): the
built lattice keeps 16·(d+1) bytes per point (static layout: vertex row int64, weight and
alpha·weight float32 of each simplex vertex; compact layout: its CSR matrices, 24·(d+1)) and 16·(d+1) bytes
per vertex row (two blur neighbours per axis, int64); one filter call holds about
4·K·(4·R + 10·N') bytes; the build peaks near (d+1)·N'·(96 + 16·S) + 8·(3·d + 11)·R bytes
(S = key-sorting stages, 2 for d = 5 on the static layout). For d = 5 on the static layout: about
0.7 KB per pixel kept, 2 KB per pixel at the build's peak and 136·K bytes per pixel per filter
call. `estimate_lattice_bytes` computes the peak, and `lattice_filter` / `bilateral_filter_torch`
split a batch into chunks of images that fit `memory_budget`.
"""
from __future__ import annotations

import math
import warnings
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Flavour = Literal["rrm", "densecrf"]
FLAVOURS = ("rrm", "densecrf")
DEFAULT_MEMORY_BUDGET = 2 * 1024 ** 3  # bytes per chunk of images (build + one filter call)
_MAX_IMAGES_PER_BUILD = 2 ** 15
_LANE_BITS = 16
_LANE_MASK = (1 << _LANE_BITS) - 1
_KEY_LIMIT = 2 ** 63  # keys are int64 in [0, 2^63)


def float32_value(value: float) -> float:
    """A Python float holding exactly the float32 rounding of value."""
    return float(np.float32(value))


def _scale_factors(dim: int) -> list[float]:
    # As in both C++ codes: inv_std_dev is a float; each factor is computed in double, stored as float.
    inv_std_dev = float32_value(math.sqrt(2.0 / 3.0) * (dim + 1))
    return [float32_value(1.0 / math.sqrt(float((i + 2) * (i + 1))) * inv_std_dev) for i in range(dim)]


def _alpha(dim: int) -> float:
    return float32_value(1.0 / float32_value(1.0 + float32_value(2.0 ** -dim)))


def _padded_points(num_points: int) -> int:
    return num_points + (1 if num_points % 4 else 0)


def _static_stages(num_images: int, dim: int, num_entries: int) -> int:
    """Key-sorting stages of the static layout: 16-bit digits packed into int64 keys."""
    stages, lane, prefix = 0, 0, num_images
    while lane < dim or stages == 0:
        capacity = prefix
        while lane < dim and capacity << _LANE_BITS <= _KEY_LIMIT:
            capacity <<= _LANE_BITS
            lane += 1
        stages, prefix = stages + 1, num_entries
    return stages


def estimate_lattice_bytes(num_images: int, num_points: int, dim: int, channels: int) -> int:
    """Approximate peak bytes of building a lattice over num_images images and one filter call.

    For the static layout (an upper bound for the compact one, whose vertex arrays are smaller).
    """
    for name, value in (("num_images", num_images), ("num_points", num_points), ("dim", dim),
                        ("channels", channels)):
        if int(value) < 1:
            raise ValueError(f"estimate_lattice_bytes: {name} must be >= 1, got {value}")
    points = int(num_images) * _padded_points(int(num_points))
    entries = points * (dim + 1)
    rows = entries + 1
    stages = _static_stages(int(num_images), dim, entries)
    build = entries * (96 + 16 * stages) + rows * 8 * (3 * dim + 11)
    kept = entries * 16 + rows * 16 * (dim + 1)
    filter_call = 4 * channels * (4 * rows + 10 * points)
    return int(max(build, kept + filter_call))


def images_per_chunk(num_points: int, dim: int, channels: int,
                     memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """How many images fit one build + filter call within memory_budget bytes (at least 1)."""
    per_image = estimate_lattice_bytes(1, num_points, dim, channels)
    return max(1, min(_MAX_IMAGES_PER_BUILD, int(memory_budget) // per_image))


def _check_tensor(name: str, tensor: object, ndims: tuple[int, ...]) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() not in ndims:
        shapes = " or ".join({3: "(B, C, N)", 4: "(B, C, H, W)"}[n] for n in ndims)
        raise ValueError(f"{name} must have shape {shapes}, got {tuple(tensor.shape)}")
    return tensor


def _check_float32(name: str, tensor: Tensor) -> None:
    if tensor.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {tensor.dtype}")


class PermutohedralLattice:
    """A permutohedral lattice over the points of a batch of images, built once, filtered often.

    features: (B, d, N) or (B, d, H, W) float32, already divided by their standard deviations,
    finite, with |coordinate|·(d+1) well below 2^22 (as the C++ codes require; the compact layout
    checks finiteness). flavour: "rrm" (released bilateral filter) or "densecrf" (pydensecrf).
    static_shapes: the sync-free layout with upper-bound vertex arrays (default: True on CUDA).
    """

    def __init__(self, features: Tensor, *, flavour: Flavour = "rrm",
                 static_shapes: bool | None = None) -> None:
        features = _check_tensor("features", features, (3, 4))
        _check_float32("features", features)
        if flavour not in FLAVOURS:
            raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
        batch, dim = features.shape[:2]
        num_points = math.prod(features.shape[2:])
        if batch < 1 or dim < 1 or num_points < 1:
            raise ValueError(f"features must have B, d, N >= 1, got shape {tuple(features.shape)}")
        if batch > _MAX_IMAGES_PER_BUILD:
            raise ValueError(f"features: at most {_MAX_IMAGES_PER_BUILD} images per build, got {batch} "
                             f"(lattice_filter splits batches)")
        if batch * _padded_points(num_points) * (dim + 1) >= 2 ** 31 - 1:
            raise ValueError(f"features: too many points for one lattice ({batch}×{num_points}, d={dim})")
        self.flavour = flavour
        self.device = features.device
        self.num_images, self.dim, self.num_points = batch, dim, num_points
        self.padded_points = _padded_points(num_points)
        self.spatial_shape = tuple(features.shape[2:])
        self.static_shapes = features.is_cuda if static_shapes is None else bool(static_shapes)
        self.alpha = _alpha(dim)
        if not self.static_shapes and not bool(torch.isfinite(features).all()):
            raise ValueError("features must be finite")
        self._build(features.reshape(batch, dim, num_points))

    @property
    def num_vertices(self) -> int | Tensor:
        """Vertices of the whole batch: an int (compact layout) or a 0-dim device tensor (static)."""
        return self._num_vertices

    # ----------------------------------------------------------------------------------- build
    def _build(self, features: Tensor) -> None:
        batch, d, n, points = self.num_images, self.dim, self.num_points, self.padded_points
        device = features.device
        if points != n:
            # The released code elevates points four at a time; the zero-feature lanes padding the
            # last group insert their simplex too (one such point per image stands for them all).
            features = torch.cat([features, features.new_zeros(batch, d, 1)], dim=2)
        flat_points = batch * points
        coordinates = features.transpose(0, 1).reshape(d, flat_points)  # image-major points
        scale = _scale_factors(d)
        inv_dp1 = float32_value(1.0 / (d + 1))

        # Elevation y = E·f (p.5 of Adams et al.), float operations in the C++ order.
        elevated: list[Tensor] = [coordinates[0]] * (d + 1)
        sm = torch.zeros_like(coordinates[0])
        for j in range(d, 0, -1):
            cf = coordinates[j - 1] * scale[j - 1]
            elevated[j] = sm - float(j) * cf
            sm = sm + cf
        elevated[0] = sm

        # Closest 0-coloured lattice point: round half to even, as the SSE code does.
        rem0: list[Tensor] = []
        remainder: list[Tensor] = []
        coord_sum = torch.zeros_like(sm)
        for i in range(d + 1):
            rounded = torch.round(elevated[i] * inv_dp1)
            rem0.append(rounded * float(d + 1))
            coord_sum = coord_sum + rounded
            remainder.append(elevated[i] - rem0[i])
        # rank[i] = #{j < i: r_j >= r_i} + #{j > i: r_j > r_i} (the C++ pairwise float comparisons),
        # plus the rounded coordinates' sum, wrapped into 0..d: the point back onto the plane.
        total = coord_sum.to(torch.int64)
        ranks: list[Tensor] = []
        for i in range(d + 1):
            rank = total.clone()
            for j in range(d + 1):
                if j != i:
                    rank += (remainder[j] >= remainder[i]) if j < i else (remainder[j] > remainder[i])
            shift = torch.where(rank < 0, d + 1, 0) - torch.where(rank > d, d + 1, 0)
            ranks.append(rank + shift)
            rem0[i] = rem0[i] + shift.to(torch.float32)
        del remainder, coord_sum, total
        rank_all = torch.stack(ranks)  # (d+1, B·P)
        del ranks

        # Barycentric coordinates (p.10): v of the coordinate with rank k goes to slot d − k (+)
        # and d − k + 1 (−); slot d+1 wraps onto slot 0.
        v = torch.stack([(elevated[i] - rem0[i]) * inv_dp1 for i in range(d + 1)])
        by_rank = torch.zeros_like(v).scatter_(0, rank_all, v)
        weights = torch.empty_like(v)
        weights[0] = by_rank[d] + (1.0 + (0.0 - by_rank[0]))
        down = torch.arange(d - 1, -1, -1, device=device)  # weights[r] = by_rank[d−r] − by_rank[d−r+1]
        weights[1:] = by_rank.index_select(0, down) - by_rank.index_select(0, down + 1)
        del by_rank, v, elevated

        # Vertex r of a point's simplex: coordinate i = rem0_i + r, minus d+1 where rank_i > d − r.
        # Entries are ordered (r, point).
        base = torch.stack(rem0[:d]).to(torch.int64)  # (d, B·P)
        rank_with_last = rank_all
        rank_all = rank_all[:d]
        del rem0
        num_entries = (d + 1) * flat_points
        r_column = torch.arange(d + 1, device=device).unsqueeze(1)

        def entry_coordinates(lane: int) -> Tensor:
            over = (rank_all[lane].unsqueeze(0) > (d - r_column)).to(torch.int64)
            return (base[lane].unsqueeze(0) + r_column - (d + 1) * over).reshape(-1)

        def vertex_coordinates(lane: int, entry: Tensor) -> Tensor:
            r, point = entry // flat_points, entry % flat_points
            over = (rank_all[lane].index_select(0, point) > (d - r)).to(torch.int64)
            return base[lane].index_select(0, point) + r - (d + 1) * over

        # The C++ keys hold each coordinate in 16 bits that wrap. Each lane is a key digit: its 16
        # wrapped bits, or (compact layout) where the lane's coordinates and their blur neighbours
        # span at most 2^16 values — so wrapping identifies none of them — coordinate − offset.
        digits: list[tuple[int | None, int]] = []  # (offset or None = wrap, radix)
        for lane in range(d):
            if not self.static_shapes:
                low, high = int(base[lane].min()), int(base[lane].max())
                radix = high - low + 3 * d + 2  # vertices in [low − d, high + d], queries one step on
                if radix <= 1 << _LANE_BITS:
                    digits.append((low - d - 1, radix))
                    continue
            digits.append((None, 1 << _LANE_BITS))

        self._digits = digits

        def digit(lane: int, coordinate: Tensor) -> Tensor:
            offset = digits[lane][0]
            return coordinate & _LANE_MASK if offset is None else coordinate - offset

        entry_image = (torch.arange(flat_points, device=device) // points).repeat(d + 1)

        # Exact dedup: sort mixed-radix int64 keys stage by stage (as many digits as fit in each);
        # the dense rank of a stage's keys leads the next stage's key. The last rank is the vertex.
        stages: list[list[int]] = []
        tables: list[tuple[Tensor, Tensor]] = []
        vertex_id = entry_image
        prefix_radix, lane = batch, 0
        while lane < d or not stages:
            stage_lanes: list[int] = []
            capacity = prefix_radix
            while lane < d and capacity * digits[lane][1] <= _KEY_LIMIT:
                capacity *= digits[lane][1]
                stage_lanes.append(lane)
                lane += 1
            if stage_lanes and all(digits[i][0] is not None for i in stage_lanes):
                key = self._offset_stage_key(stage_lanes, digits, base, rank_with_last, vertex_id)
            else:
                key = vertex_id
                for i in stage_lanes:
                    key = key * digits[i][1] + digit(i, entry_coordinates(i))
            sorted_key, order = torch.sort(key, stable=True)
            del key
            is_first = torch.ones_like(sorted_key, dtype=torch.bool)
            is_first[1:] = sorted_key[1:] != sorted_key[:-1]
            dense = torch.cumsum(is_first, 0) - 1
            vertex_id = torch.empty_like(dense).scatter_(0, order, dense)
            stages.append(stage_lanes)
            tables.append((sorted_key, dense))
            prefix_radix = num_entries if self.static_shapes else int(dense[-1]) + 1
        num_vertices = tables[-1][1][-1] + 1  # a device tensor
        if self.static_shapes:
            rows_count = num_entries + 1
            self._num_vertices: int | Tensor = num_vertices
        else:
            self._num_vertices = int(num_vertices)
            rows_count = self._num_vertices + 1
        self.num_rows = rows_count
        entry_row = vertex_id + 1  # row 0 is the zero row that missing neighbours read
        del vertex_id

        # One entry per vertex row gives the vertex's coordinates.
        representative = torch.zeros(rows_count, dtype=torch.int64, device=device)
        representative.scatter_reduce_(0, entry_row, torch.arange(num_entries, device=device), "amax")
        vertex_coords = [vertex_coordinates(i, representative) for i in range(d)]
        vertex_image = entry_image.index_select(0, representative)
        del representative, entry_image
        row_index = torch.arange(rows_count, device=device)
        valid_row = row_index >= 1
        if self.static_shapes:
            valid_row &= row_index <= num_vertices

        # Blur neighbours along each axis j: n1 = key − 1 on every lane but lane j, which gets + d
        # (axis d changes no stored lane); n2 is the inverse step, so n2[n1[v]] = v.
        neighbours = torch.zeros(d + 1, 2, rows_count, dtype=torch.int64, device=device)
        for j in range(d + 1):
            found = valid_row.clone()
            ids = vertex_image
            for stage_lanes, (sorted_key, dense) in zip(stages, tables):
                key = ids
                for i in stage_lanes:
                    key = key * digits[i][1] + digit(i, vertex_coords[i] + (d if i == j else -1))
                position = torch.searchsorted(sorted_key, key).clamp_(max=num_entries - 1)
                found &= sorted_key.index_select(0, position) == key
                ids = dense.index_select(0, position)
            n1 = torch.where(found, ids + 1, 0)
            neighbours[j, 0] = n1
            neighbours[j, 1].scatter_(0, n1, row_index)
            neighbours[j, 1, 0] = 0  # rows without n1 all wrote here
        self._neighbours = neighbours
        del tables, vertex_coords, vertex_image

        entry_rows = entry_row.view(d + 1, flat_points)
        slice_weights = weights * self.alpha
        if self.static_shapes:
            self._entry_rows, self._weights, self._slice_weights = entry_rows, weights, slice_weights  # (d+1, B·P)
        else:
            # The last stage's sort orders the entries by vertex: the splat matrix's rows.
            crow = torch.cat([torch.zeros(2, dtype=torch.int64, device=device), is_first.nonzero()[1:, 0],
                              torch.full((1,), num_entries, dtype=torch.int64, device=device)])
            with warnings.catch_warnings():  # sparse CSR is "beta"
                warnings.simplefilter("ignore", UserWarning)
                self._splat_matrix = torch.sparse_csr_tensor(
                    crow, order % flat_points, weights.reshape(-1).index_select(0, order),
                    (rows_count, flat_points), check_invariants=False)
                self._slice_matrix = torch.sparse_csr_tensor(
                    torch.arange(0, num_entries + 1, d + 1, device=device), entry_rows.t().reshape(-1),
                    slice_weights.t().reshape(-1), (flat_points, rows_count), check_invariants=False)

    def _offset_stage_key(self, lanes: list[int], digits: list[tuple[int | None, int]], base: Tensor,
                          rank: Tensor, prefix: Tensor) -> Tensor:
        """The mixed-radix keys of all entries for offset digits, computed per point.

        Σ_i stride_i·(coordinate_i − offset_i) with coordinate_i = base_i + r − (d+1)·[rank_i > d − r]
        is A + r·C − (d+1)·T_r: A = Σ stride_i·(base_i − offset_i) and C = Σ stride_i per point, and
        T_r the strides of the lanes ranked above d − r, a cumulative sum over ranks. Equal to the
        digit-by-digit (Horner) key. prefix: (E,) leading key (the previous stage's rank, or the
        entry's image for the first stage).
        """
        d = self.dim
        strides: dict[int, int] = {}
        capacity = 1
        for i in reversed(lanes):
            strides[i] = capacity
            capacity *= digits[i][1]
        flat_points = base.shape[1]
        per_point = torch.zeros(flat_points, dtype=torch.int64, device=base.device)
        for i in lanes:
            per_point += (base[i] - digits[i][0]) * strides[i]
        lane_stride = torch.tensor([strides.get(i, 0) for i in range(d + 1)], dtype=torch.int64)
        lane_stride = lane_stride.to(base.device)  # (a copy, on the compact layout only)
        by_rank = torch.zeros_like(rank).scatter_(0, rank, lane_stride.view(d + 1, 1).expand_as(rank))
        above = torch.zeros_like(rank)
        above[1:] = torch.cumsum(by_rank.flip(0), 0)[:d]  # above[r] = Σ strides of ranks > d − r
        r_column = torch.arange(d + 1, device=base.device).unsqueeze(1)
        local = (per_point.unsqueeze(0) + r_column * sum(strides.values())) - (d + 1) * above
        return prefix * capacity + local.reshape(-1)

    # ----------------------------------------------------------------------------------- filter
    def filter(self, values: Tensor, *, value_size: int | Tensor | None = None) -> Tensor:
        """Σ_j k(f_i, f_j)·v_j per image: values (B, K, N) or (B, K, H, W) float32, same shape out.

        value_size (densecrf flavour, static layout): the channel count pydensecrf would filter in
        one call, an int or a (B,) integer tensor per image; <= 2 selects its sequential slice
        arithmetic. Default: K.
        """
        values = _check_tensor("values", values, (3, 4))
        _check_float32("values", values)
        if values.device != self.device:
            raise ValueError(f"values is on {values.device}, the lattice on {self.device}")
        batch, channels = values.shape[:2]
        if batch != self.num_images or math.prod(values.shape[2:]) != self.num_points or channels < 1:
            raise ValueError(f"values must have shape (B={self.num_images}, K>=1, N={self.num_points}) or "
                             f"(B, K, {', '.join(map(str, self.spatial_shape))}), got {tuple(values.shape)}")
        d, points = self.dim, self.padded_points
        sequential = self._sequential_images(channels if value_size is None else value_size)
        point_major = values.new_zeros(batch, points, channels)
        point_major[:, : self.num_points] = values.reshape(batch, channels, self.num_points).transpose(1, 2)
        point_major = point_major.view(batch * points, channels)

        # Splat: every vertex sums weight·value of its points.
        if self.static_shapes:
            vertex_values = values.new_zeros(self.num_rows, channels)
            for r in range(d + 1):
                vertex_values.index_add_(0, self._entry_rows[r], point_major * self._weights[r].unsqueeze(1))
        else:
            vertex_values = self._splat_matrix @ point_major
        del point_major

        # Blur along each axis: old + 0.5·(n1 + n2); row 0 (missing neighbours) stays zero.
        for j in range(d + 1):
            blurred = vertex_values.index_select(0, self._neighbours[j, 0])
            blurred += vertex_values.index_select(0, self._neighbours[j, 1])
            blurred *= 0.5
            blurred += vertex_values
            vertex_values = blurred

        # Slice: Σ_r (weight_r·alpha)·row_r from r = 0 on; densecrf's sequential code sums
        # (weight_r·row_r)·alpha.
        if not self.static_shapes:
            out = self._slice_matrix @ vertex_values
        else:
            # Per point, (row·weight)·scale: weight·alpha and 1 for the usual sum, weight and alpha
            # for densecrf's sequential one (multiplying by 1 is exact).
            weights, scale = self._slice_weights, None
            if sequential is True:
                weights, scale = self._weights, self.alpha
            elif sequential is not False:
                per_point = sequential.view(batch, 1).expand(batch, points).reshape(-1)
                weights = torch.where(per_point, self._weights, self._slice_weights)
                scale = torch.where(per_point, self.alpha, 1.0).to(values.dtype).unsqueeze(1)
            out = None
            for r in range(d + 1):
                term = vertex_values.index_select(0, self._entry_rows[r]).mul_(weights[r].unsqueeze(1))
                if scale is not None:
                    term.mul_(scale)
                out = term if out is None else out.add_(term)
        assert out is not None
        out = out.view(batch, points, channels)[:, : self.num_points].transpose(1, 2).contiguous()
        return out.view(values.shape)

    def _sequential_images(self, value_size: int | Tensor) -> bool | Tensor:
        """False, True, or per image (B,) bool: whether densecrf would slice sequentially."""
        if isinstance(value_size, Tensor):
            if value_size.shape != (self.num_images,) or value_size.is_floating_point() \
                    or value_size.is_complex():
                raise ValueError(f"value_size must be an int or a ({self.num_images},) integer tensor, "
                                 f"got {value_size.dtype} {tuple(value_size.shape)}")
            if self.flavour != "densecrf":
                return False
            return value_size.to(self.device) <= 2
        if int(value_size) < 1:
            raise ValueError(f"value_size must be >= 1, got {value_size}")
        return self.flavour == "densecrf" and int(value_size) <= 2


def lattice_filter(features: Tensor, values: Tensor, *, flavour: Flavour = "rrm",
                   memory_budget: int = DEFAULT_MEMORY_BUDGET, static_shapes: bool | None = None,
                   value_size: int | Tensor | None = None) -> Tensor:
    """Builds lattices over chunks of images (each within memory_budget bytes) and filters values.

    features (B, d, N) or (B, d, H, W) float32; values (B, K, N) or (B, K, H, W) float32 over the
    same points. Returns values' shape on their device; the result does not depend on the chunks.
    """
    features = _check_tensor("features", features, (3, 4))
    values = _check_tensor("values", values, (3, 4))
    _check_float32("features", features)
    _check_float32("values", values)
    if features.shape[0] != values.shape[0] or math.prod(features.shape[2:]) != math.prod(values.shape[2:]):
        raise ValueError(f"features {tuple(features.shape)} and values {tuple(values.shape)} must share "
                         f"B and the points")
    if features.device != values.device:
        raise ValueError(f"features is on {features.device}, values on {values.device}")
    batch, dim = features.shape[:2]
    chunk = images_per_chunk(math.prod(features.shape[2:]), dim, values.shape[1], memory_budget)
    outputs = []
    for start in range(0, batch, chunk):
        part = slice(start, start + chunk)
        lattice = PermutohedralLattice(features[part], flavour=flavour, static_shapes=static_shapes)
        size = value_size[part] if isinstance(value_size, Tensor) else value_size
        outputs.append(lattice.filter(values[part], value_size=size))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def bilateral_features(images: Tensor, sigma_rgb: float | None, sigma_xy: float) -> Tensor:
    """(x/σxy, y/σxy[, r/σrgb, g/σrgb, b/σrgb]) per pixel, x = column: images (B, 3, H, W) 0..255.

    Float32 divisions by float32 sigmas on the images' device, as both C++ front ends compute them.
    sigma_rgb None gives the xy-only (d = 2) features (any channel count). Returns (B, d, H, W).
    """
    images = _check_tensor("images", images, (4,))
    if sigma_rgb is not None and images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not (images.is_floating_point() or images.dtype == torch.uint8):
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    for name, sigma in (("sigma_xy", sigma_xy), ("sigma_rgb", sigma_rgb)):
        if sigma is not None and not (math.isfinite(float(sigma)) and float(sigma) > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {sigma}")
    batch, _, height, width = images.shape
    device = images.device

    def divide(x: Tensor, sigma: float) -> Tensor:
        # A device tensor divisor keeps a true division (CUDA turns a scalar divisor into a reciprocal).
        # (torch.full, not torch.tensor: no host-to-device copy, which would synchronise.)
        return x / torch.full((), float32_value(sigma), dtype=torch.float32, device=device)

    cols = divide(torch.arange(width, dtype=torch.float32, device=device), sigma_xy)
    rows = divide(torch.arange(height, dtype=torch.float32, device=device), sigma_xy)
    planes = [cols.view(1, 1, 1, width).expand(batch, 1, height, width),
              rows.view(1, 1, height, 1).expand(batch, 1, height, width)]
    if sigma_rgb is not None:
        planes.append(divide(images.to(torch.float32), sigma_rgb))
    return torch.cat(planes, dim=1)


def bilateral_filter_torch(images: Tensor, values: Tensor, sigma_rgb: float, sigma_xy: float, *,
                           memory_budget: int = DEFAULT_MEMORY_BUDGET,
                           static_shapes: bool | None = None) -> Tensor:
    """`tool.bilateral.bilateral_filter` in torch: images (N, 3, H, W) 0..255, values (N, K, H, W).

    Returns the float32 (N, K, H, W) Gaussian-weighted sums (released "rrm" flavour) on the
    inputs' device.
    """
    images = _check_tensor("images", images, (4,))
    values = _check_tensor("values", values, (4,))
    _check_float32("values", values)
    n, _, height, width = values.shape
    if tuple(images.shape) != (n, 3, height, width):
        raise ValueError(f"images must have shape (N, 3, H, W) = {(n, 3, height, width)} to match values "
                         f"{tuple(values.shape)}, got {tuple(images.shape)}")
    features = bilateral_features(images, sigma_rgb, sigma_xy)
    return lattice_filter(features, values, flavour="rrm", memory_budget=memory_budget,
                          static_shapes=static_shapes)
