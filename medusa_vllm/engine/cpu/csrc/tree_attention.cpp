// Medusa tree attention over vLLM 0.32's paged CPU KV cache, read in place.
//
// One query row = one tree node i of request r (root = node 0, BFS order). It
// attends to the request's prefix [0, P) and to its own ancestors-or-self in the
// tree (tree_mask[i][a]), whose K/V vLLM already wrote at positions P + a. Keys
// after P + i are never visible (in BFS order every ancestor precedes its
// descendants), so a row reads at most P + i + 1 keys.
//
// The cache is [num_blocks, kv_heads, block_size, 2 * head_size]; each
// (block, kv_head) tile of 2 * block_size * head_size elements is laid out by
// vLLM's cpu_attn_reshape_and_cache per ISA. k_offsets / v_offsets [block_size,
// head_size] give the element offset of K[t, d] / V[t, d] inside a tile, as
// learned from vLLM's own op (cache_layout.py), so every layout is read
// correctly; k_transposed marks the vec / vec16 layout (K^T [D, BS] then
// V [BS, D]), read with contiguous loops the compiler vectorises.
//
// Work is split over (row, kv head) with at::parallel_for (torch's intra-op
// threads, which vLLM binds); each task computes the GQA group of query heads
// of that KV head, in float32, and writes its output rows once.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

template <>
inline float to_float<c10::BFloat16>(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename scalar_t>
void tree_attention_impl(const torch::Tensor& query, const torch::Tensor& kv_cache,
                         const torch::Tensor& k_offsets, const torch::Tensor& v_offsets,
                         bool k_transposed, const torch::Tensor& blocks,
                         const torch::Tensor& prefix_lens, const torch::Tensor& num_tokens,
                         const torch::Tensor& tree_mask, double scale, torch::Tensor& out) {
  const int64_t M = query.size(0), Hq = query.size(1), D = query.size(2);
  const int64_t Hkv = kv_cache.size(1), BS = kv_cache.size(2);
  const int64_t G = Hq / Hkv, tile = 2 * BS * D;
  const int64_t R = prefix_lens.size(0), nblk = blocks.size(1), N1 = tree_mask.size(0);

  const scalar_t* q = query.data_ptr<scalar_t>();
  const scalar_t* cache = kv_cache.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t* koff = k_offsets.data_ptr<int64_t>();
  const int64_t* voff = v_offsets.data_ptr<int64_t>();
  const int64_t* blk = blocks.data_ptr<int64_t>();
  const int64_t* plen = prefix_lens.data_ptr<int64_t>();
  const int64_t* ntok = num_tokens.data_ptr<int64_t>();
  const bool* mask = tree_mask.data_ptr<bool>();

  // row -> (request, node), and the longest key range any row reads
  std::vector<int64_t> row_req(M), row_node(M);
  int64_t row = 0, max_keys = 1;
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(ntok[r] >= 1 && ntok[r] <= N1, "tree_attention: request ", r, " has ", ntok[r],
                " tree rows, the tree mask ", N1);
    for (int64_t i = 0; i < ntok[r]; ++i, ++row) {
      TORCH_CHECK(row < M, "tree_attention: num_tokens sum exceeds the query rows");
      row_req[row] = r;
      row_node[row] = i;
    }
    max_keys = std::max(max_keys, plen[r] + ntok[r]);
  }
  TORCH_CHECK(row == M, "tree_attention: num_tokens sum (", row, ") != query rows (", M, ")");
  TORCH_CHECK(max_keys <= nblk * BS, "tree_attention: blocks cover ", nblk * BS,
              " keys, a request needs ", max_keys);
  const int64_t padded = ((max_keys + BS - 1) / BS) * BS;
  const float fscale = static_cast<float>(scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, M * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * padded), qf(G * D), acc(G * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t m = task / Hkv, h = task % Hkv;
      const int64_t r = row_req[m], i = row_node[m], P = plen[r];
      const int64_t L = P + i + 1;  // keys this row may see: [0, P] u ancestors
      const int64_t* rblk = blk + r * nblk;
      for (int64_t g = 0; g < G; ++g) {
        const scalar_t* qrow = q + (m * Hq + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_float(qrow[d]) * fscale;
      }
      // scores = q . K for every key up to L
      for (int64_t b = 0; b * BS < L; ++b) {
        const scalar_t* t_base = cache + (rblk[b] * Hkv + h) * tile;
        const int64_t n = std::min(BS, L - b * BS);
        for (int64_t g = 0; g < G; ++g) {
          float* s = scores.data() + g * padded + b * BS;
          for (int64_t t = 0; t < n; ++t) s[t] = 0.f;
          const float* qg = qf.data() + g * D;
          if (k_transposed) {
            for (int64_t d = 0; d < D; ++d) {
              const scalar_t* kcol = t_base + d * BS;
              const float qd = qg[d];
              for (int64_t t = 0; t < n; ++t) s[t] += qd * to_float(kcol[t]);
            }
          } else {
            for (int64_t t = 0; t < n; ++t) {
              const int64_t* ko = koff + t * D;
              float acc_t = 0.f;
              for (int64_t d = 0; d < D; ++d) acc_t += qg[d] * to_float(t_base[ko[d]]);
              s[t] = acc_t;
            }
          }
        }
      }
      // tree part: only ancestors-or-self; then a softmax per query head
      const bool* mrow = mask + i * N1;
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * padded;
        for (int64_t a = 0; a <= i; ++a)
          if (!mrow[a]) s[P + a] = neg_inf;
        float mx = neg_inf;
        for (int64_t j = 0; j < L; ++j) mx = std::max(mx, s[j]);
        float sum = 0.f;
        for (int64_t j = 0; j < L; ++j) {
          const float e = std::exp(s[j] - mx);
          s[j] = e;
          sum += e;
        }
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < L; ++j) s[j] *= inv;
      }
      // out = probs . V
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t b = 0; b * BS < L; ++b) {
        const scalar_t* t_base = cache + (rblk[b] * Hkv + h) * tile;
        const int64_t n = std::min(BS, L - b * BS);
        for (int64_t t = 0; t < n; ++t) {
          const int64_t j = b * BS + t;
          if (k_transposed) {
            const scalar_t* vrow = t_base + BS * D + t * D;
            for (int64_t g = 0; g < G; ++g) {
              const float p = scores[g * padded + j];
              if (p == 0.f) continue;
              float* ag = acc.data() + g * D;
              for (int64_t d = 0; d < D; ++d) ag[d] += p * to_float(vrow[d]);
            }
          } else {
            const int64_t* vo = voff + t * D;
            for (int64_t g = 0; g < G; ++g) {
              const float p = scores[g * padded + j];
              if (p == 0.f) continue;
              float* ag = acc.data() + g * D;
              for (int64_t d = 0; d < D; ++d) ag[d] += p * to_float(t_base[vo[d]]);
            }
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        scalar_t* orow = o + (m * Hq + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<scalar_t>(acc[g * D + d]);
      }
    }
  });
}

}  // namespace

torch::Tensor tree_attention(torch::Tensor query, torch::Tensor kv_cache, torch::Tensor k_offsets,
                             torch::Tensor v_offsets, bool k_transposed, torch::Tensor blocks,
                             torch::Tensor prefix_lens, torch::Tensor num_tokens,
                             torch::Tensor tree_mask, double scale) {
  TORCH_CHECK(query.dim() == 3 && kv_cache.dim() == 4, "tree_attention: query [M, Hq, D] and "
              "kv_cache [num_blocks, kv_heads, block_size, 2 * D] expected");
  TORCH_CHECK(query.scalar_type() == kv_cache.scalar_type(),
              "tree_attention: query and kv_cache dtypes differ");
  TORCH_CHECK(kv_cache.size(3) == 2 * query.size(2), "tree_attention: head sizes differ");
  TORCH_CHECK(query.size(1) % kv_cache.size(1) == 0,
              "tree_attention: query heads not a multiple of KV heads");
  TORCH_CHECK(k_offsets.scalar_type() == torch::kInt64 && v_offsets.scalar_type() == torch::kInt64 &&
                  blocks.scalar_type() == torch::kInt64 && prefix_lens.scalar_type() == torch::kInt64 &&
                  num_tokens.scalar_type() == torch::kInt64,
              "tree_attention: index tensors must be int64");
  TORCH_CHECK(tree_mask.scalar_type() == torch::kBool, "tree_attention: tree_mask must be bool");
  TORCH_CHECK(k_offsets.size(0) == kv_cache.size(2) && k_offsets.size(1) == query.size(2),
              "tree_attention: offsets must be [block_size, head_size]");
  query = query.contiguous();
  kv_cache = kv_cache.contiguous();
  k_offsets = k_offsets.contiguous();
  v_offsets = v_offsets.contiguous();
  blocks = blocks.contiguous();
  prefix_lens = prefix_lens.contiguous();
  num_tokens = num_tokens.contiguous();
  tree_mask = tree_mask.contiguous();
  auto out = torch::empty_like(query);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "tree_attention",
                                  [&] {
                                    tree_attention_impl<scalar_t>(
                                        query, kv_cache, k_offsets, v_offsets, k_transposed, blocks,
                                        prefix_lens, num_tokens, tree_mask, scale, out);
                                  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tree_attention", &tree_attention, "Medusa tree attention over vLLM's paged CPU KV cache");
}
