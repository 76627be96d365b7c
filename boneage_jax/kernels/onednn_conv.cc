// 2D convolutions on the CPU through oneDNN, as XLA FFI custom calls.
//
// Three handlers, all in JAX's NHWC / HWIO layouts (row-major, as XLA hands custom calls their
// operands), float32 or bfloat16:
//   boneage_onednn_conv_forward          (x, w)  -> y
//   boneage_onednn_conv_backward_data    (dy, w) -> dx
//   boneage_onednn_conv_backward_weights (x, dy) -> dw
// Attributes: strides, padding_low, padding_high, dilation (two int64 each, height then width) and
// groups (feature groups: 1, or the channel count for a depthwise convolution; the kernel is then
// (KH, KW, C / groups, O) as lax.conv_general_dilated takes it).
//
// oneDNN picks its own weight layout for each convolution (format_tag::any); the HWIO kernel is
// reordered into it (and a weight gradient out of it) on every call. Activations stay NHWC, the
// layout of oneDNN's fastest direct kernels on AVX2 and AVX-512. Primitives are built once per
// shape and kept; calls run one at a time (oneDNN parallelises each call over all cores with OpenMP).
//
// A 1x1 convolution with stride 1 and no padding is a matrix product of the (N*H*W, C) activations
// and the (C, O) kernel. Where its rows (N*H*W) are few, oneDNN's matmul (brgemm) runs it faster
// than oneDNN's 1x1 convolution kernels, and needs no weight reorder. On this project's AVX-512
// machine (2 cores; primitives timed alone) the weight gradient of 728 -> 728 channels on
// 8 x 16 x 16 took 11.6 ms against 16.0 ms (jit_1x1), 1536 -> 2048 on 8 x 8 x 8 11.0 against
// 19.0 ms; forward and data gradient gained less (0-25%) and only up to 2,048 rows; from 8 x 32 x 32
// rows up the two were about even, and at 8 x 125 x 125 the convolution kernels were faster. So
// such a convolution runs as a matmul up to kMatmulRows rows (forward, data gradient) and
// kMatmulRowsWeights rows (weight gradient) when oneDNN has a direct matmul kernel for it, as a
// convolution otherwise. A training step at 256 px, batch 8 (benchmarks/ab.py, 16 steps of each,
// interleaved; two runs): Xception 5-10% faster, ResNet-50 0-2%, InceptionV3 unchanged. The rule
// was measured on AVX-512 only. BONEAGE_ONEDNN_MATMUL=0 in the environment turns this off.
//
// Only oneDNN's direct kernels are used (jit, brgconv, jit_dw, ...), never its im2col + GEMM
// fallbacks ("gemm:jit", "x64:gemm:jit") or reference loops ("ref:any"): oneDNN 2023.2's GEMM
// backward-weights convolution crashed (a read out of bounds in im2col_dt) inside training steps
// on an AVX2 CPU, where oneDNN picks it for small feature maps (2 x 2 and below). A convolution
// with no direct kernel for its shape and dtype (also every bfloat16 one on a CPU without
// AVX-512) is reported by boneage_onednn_conv_supported, which the Python side asks while
// tracing, and stays on XLA's path.
// Built by `python -m boneage_jax.kernels.build`; loaded by boneage_jax/kernels/onednn.py.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

enum Kind : int { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

struct Key {
  int kind;
  int dtype;
  std::vector<int64_t> values;  // x dims, w dims, y dims, strides, pads, dilation, groups
  bool operator<(const Key& other) const {
    return std::tie(kind, dtype, values) < std::tie(other.kind, other.dtype, other.values);
  }
};

// Up to how many rows (N * H * W) a 1x1 convolution runs as a matmul (see the top of this file).
constexpr int64_t kMatmulRows = 2048;
constexpr int64_t kMatmulRowsWeights = 8192;

struct Entry {
  dnnl::primitive convolution;  // or, with `matmul`, the matmul primitive
  bool matmul = false;
  memory::desc a, b, c;  // with `matmul`: the product's operands (c = a * b) as views of the buffers
  std::string implementation;  // oneDNN's name for the kernel (impl_info_str)
  memory::desc src, weights, dst;  // the primitive's (weights may be blocked)
  memory::desc user_weights;       // HWIO
  bool reorder = false;
  dnnl::reorder weights_reorder;   // user -> primitive (forward, backward data) or back (weights)
  std::shared_ptr<void> weights_buffer;
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

std::mutex& Lock() {
  static std::mutex mutex;
  return mutex;
}

std::map<Key, std::unique_ptr<Entry>>& Cache() {
  static std::map<Key, std::unique_ptr<Entry>> cache;
  return cache;
}

std::shared_ptr<void> Allocate(size_t bytes) {
  void* pointer = nullptr;
  if (posix_memalign(&pointer, 64, bytes > 0 ? bytes : 64) != 0) throw std::bad_alloc();
  return std::shared_ptr<void>(pointer, free);
}

// Whether a primitive descriptor's implementation is a direct kernel (see the top of this file).
bool Direct(const dnnl::primitive_desc_base& pd) {
  const std::string name = pd.impl_info_str();
  return name.rfind("gemm", 0) != 0 && name.rfind("x64:gemm", 0) != 0 && name.rfind("ref", 0) != 0;
}

// Moves `pd` to its first direct implementation; false when it has none.
template <typename PrimitiveDesc>
bool FirstDirect(PrimitiveDesc& pd) {
  do {
    if (Direct(pd)) return true;
  } while (pd.next_impl());
  return false;
}

// Whether x's channels are `groups` groups of w's input channels and w's outputs split evenly.
bool GroupsFit(const int64_t* x, const int64_t* w, int64_t groups) {
  return groups >= 1 && x[3] == w[2] * groups && w[3] % groups == 0;
}

bool MatmulAllowed() {
  static const bool allowed = [] {
    const char* value = std::getenv("BONEAGE_ONEDNN_MATMUL");
    return value == nullptr || std::string(value) != "0";
  }();
  return allowed;
}

// The matmul that computes a 1x1, stride-1, unpadded, ungrouped convolution of `kind`, when the
// rule at the top of this file picks it and oneDNN has a direct kernel; false otherwise.
// m rows, c input and o output channels; the activations are (m, c) / (m, o) row-major and the
// HWIO kernel is (c, o) row-major.
bool MatmulFor(Kind kind, memory::data_type dtype, int64_t m, int64_t c, int64_t o, Entry& entry) {
  if (!MatmulAllowed() || m > (kind == kBackwardWeights ? kMatmulRowsWeights : kMatmulRows)) return false;
  auto view = [dtype](int64_t rows, int64_t cols, bool transposed) {
    // A (rows, cols) operand; transposed: the buffer holds its (cols, rows) transpose row-major.
    return memory::desc({rows, cols}, dtype, transposed ? memory::dims{1, rows} : memory::dims{cols, 1});
  };
  if (kind == kForward) {             // y (m, o) = x (m, c) * w (c, o)
    entry.a = view(m, c, false), entry.b = view(c, o, false), entry.c = view(m, o, false);
  } else if (kind == kBackwardData) {  // dx (m, c) = dy (m, o) * w^T (o, c)
    entry.a = view(m, o, false), entry.b = view(o, c, true), entry.c = view(m, c, false);
  } else {                            // dw (c, o) = x^T (c, m) * dy (m, o)
    entry.a = view(c, m, true), entry.b = view(m, o, false), entry.c = view(c, o, false);
  }
  auto pd = dnnl::matmul::primitive_desc(Engine(), entry.a, entry.b, entry.c, dnnl::primitive_attr(),
                                         /*allow_empty=*/true);
  if (!pd || !FirstDirect(pd)) return false;
  entry.convolution = dnnl::matmul(pd);
  entry.implementation = pd.impl_info_str();
  entry.matmul = true;
  return true;
}

// The primitive for one convolution, built on first use and kept; nullptr (also kept) when oneDNN
// has no direct kernel for it. Called with Lock() held.
// x: (N, H, W, C); w: (KH, KW, C, O); y: (N, OH, OW, O); strides, low, high, dilation: 2 values.
Entry* Lookup(Kind kind, memory::data_type dtype, const int64_t* x, const int64_t* w, const int64_t* y,
              const int64_t* strides, const int64_t* low, const int64_t* high, const int64_t* dilation,
              int64_t groups) {
  Key key{kind, static_cast<int>(dtype), {}};
  for (auto [values, size] : {std::pair{x, 4}, {w, 4}, {y, 4}, {strides, 2}, {low, 2}, {high, 2}, {dilation, 2}}) {
    key.values.insert(key.values.end(), values, values + size);
  }
  key.values.push_back(groups);
  auto& cache = Cache();
  auto found = cache.find(key);
  if (found != cache.end()) return found->second.get();

  memory::dims src_dims = {x[0], x[3], x[1], x[2]};
  // HWIO, or for groups > 1 HW(I/G)(G O/G): oneDNN's hwio and hwigo.
  memory::dims weight_dims = groups == 1 ? memory::dims{w[3], w[2], w[0], w[1]}
                                         : memory::dims{groups, w[3] / groups, w[2], w[0], w[1]};
  tag user_tag = groups == 1 ? tag::hwio : tag::hwigo;
  memory::dims dst_dims = {y[0], y[3], y[1], y[2]};
  memory::dims stride_dims = {strides[0], strides[1]};
  memory::dims dilate_dims = {dilation[0] - 1, dilation[1] - 1};  // oneDNN counts the gaps
  memory::dims low_dims = {low[0], low[1]}, high_dims = {high[0], high[1]};
  memory::desc src_md(src_dims, dtype, tag::nhwc), dst_md(dst_dims, dtype, tag::nhwc);
  memory::desc any_weights(weight_dims, dtype, tag::any);

  auto entry = std::make_unique<Entry>();
  const bool pointwise = w[0] == 1 && w[1] == 1 && groups == 1 && strides[0] == 1 && strides[1] == 1 &&
                         low[0] == 0 && low[1] == 0 && high[0] == 0 && high[1] == 0;
  if (pointwise && MatmulFor(kind, dtype, x[0] * x[1] * x[2], x[3], y[3], *entry)) {
    Entry* result = entry.get();
    cache.emplace(std::move(key), std::move(entry));
    return result;
  }
  entry->user_weights = memory::desc(weight_dims, dtype, user_tag);
  // allow_empty: a shape or dtype oneDNN cannot run (bfloat16 without AVX-512) is "no kernel", not an error.
  auto forward = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src_md, any_weights, dst_md,
      stride_dims, dilate_dims, low_dims, high_dims, dnnl::primitive_attr(), /*allow_empty=*/true);
  bool direct = false;
  if (!forward) {
    // no kernel at all: direct stays false
  } else if (kind == kForward) {
    if ((direct = FirstDirect(forward))) {
      entry->convolution = dnnl::convolution_forward(forward);
      entry->implementation = forward.impl_info_str();
      entry->weights = forward.weights_desc();
    }
  } else if (kind == kBackwardData) {
    auto backward = dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, src_md, any_weights, dst_md, stride_dims, dilate_dims,
        low_dims, high_dims, forward, dnnl::primitive_attr(), /*allow_empty=*/true);
    if (backward && (direct = FirstDirect(backward))) {
      entry->convolution = dnnl::convolution_backward_data(backward);
      entry->implementation = backward.impl_info_str();
      entry->weights = backward.weights_desc();
    }
  } else {
    auto backward = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, src_md, any_weights, dst_md, stride_dims, dilate_dims,
        low_dims, high_dims, forward, dnnl::primitive_attr(), /*allow_empty=*/true);
    if (backward && (direct = FirstDirect(backward))) {
      entry->convolution = dnnl::convolution_backward_weights(backward);
      entry->implementation = backward.impl_info_str();
      entry->weights = backward.diff_weights_desc();
    }
  }
  if (!direct) {
    cache.emplace(std::move(key), nullptr);
    return nullptr;
  }
  entry->src = src_md;
  entry->dst = dst_md;
  entry->reorder = entry->weights != entry->user_weights;
  if (entry->reorder) {
    entry->weights_buffer = Allocate(entry->weights.get_size());
    entry->weights_reorder =
        kind == kBackwardWeights
            ? dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), entry->weights, Engine(), entry->user_weights))
            : dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), entry->user_weights, Engine(), entry->weights));
  }
  Entry* result = entry.get();
  cache.emplace(std::move(key), std::move(entry));
  return result;
}

ffi::Error Run(Kind kind, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
               ffi::Span<const int64_t> strides, ffi::Span<const int64_t> low, ffi::Span<const int64_t> high,
               ffi::Span<const int64_t> dilation, int64_t groups) {
  memory::data_type dtype;
  switch (a.element_type()) {
    case ffi::DataType::F32: dtype = memory::data_type::f32; break;
    case ffi::DataType::BF16: dtype = memory::data_type::bf16; break;
    default: return ffi::Error(ffi::ErrorCode::kInvalidArgument, "oneDNN convolution: float32 or bfloat16 only");
  }
  if (a.dimensions().size() != 4 || b.dimensions().size() != 4 || out->dimensions().size() != 4 ||
      strides.size() != 2 || low.size() != 2 || high.size() != 2 || dilation.size() != 2 || groups < 1) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "oneDNN convolution: 4-D operands, 2 spatial attributes");
  }
  // Which buffer is x (NHWC input), w (HWIO kernel) and y (NHWC output) for this kind.
  ffi::Span<const int64_t> x, w, y;
  void *x_data, *w_data, *y_data;
  if (kind == kForward) {
    x = a.dimensions(), w = b.dimensions(), y = out->dimensions();
    x_data = a.untyped_data(), w_data = b.untyped_data(), y_data = out->untyped_data();
  } else if (kind == kBackwardData) {
    y = a.dimensions(), w = b.dimensions(), x = out->dimensions();
    y_data = a.untyped_data(), w_data = b.untyped_data(), x_data = out->untyped_data();
  } else {
    x = a.dimensions(), y = b.dimensions(), w = out->dimensions();
    x_data = a.untyped_data(), y_data = b.untyped_data(), w_data = out->untyped_data();
  }
  try {
    std::lock_guard<std::mutex> guard(Lock());
    if (!GroupsFit(&x[0], &w[0], groups)) {
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "oneDNN convolution: channels do not match the groups");
    }
    Entry* entry = Lookup(kind, dtype, &x[0], &w[0], &y[0], &strides[0], &low[0], &high[0], &dilation[0], groups);
    if (entry == nullptr) {
      return ffi::Error(ffi::ErrorCode::kUnimplemented,
                        "oneDNN convolution: no direct kernel for this shape (boneage_onednn_conv_supported says so)");
    }
    dnnl::stream stream(Engine());
    if (entry->matmul) {  // c = a * b: which buffer is which, by kind (see MatmulFor)
      void* a_data = kind == kBackwardData ? y_data : x_data;
      void* b_data = kind == kBackwardWeights ? y_data : w_data;
      void* c_data = kind == kForward ? y_data : kind == kBackwardData ? x_data : w_data;
      memory a_memory(entry->a, Engine(), a_data), b_memory(entry->b, Engine(), b_data), c_memory(entry->c, Engine(), c_data);
      entry->convolution.execute(stream, {{DNNL_ARG_SRC, a_memory}, {DNNL_ARG_WEIGHTS, b_memory}, {DNNL_ARG_DST, c_memory}});
      stream.wait();
      return ffi::Error::Success();
    }
    memory src(entry->src, Engine(), x_data), dst(entry->dst, Engine(), y_data);
    memory user_weights(entry->user_weights, Engine(), w_data);
    memory weights = entry->reorder ? memory(entry->weights, Engine(), entry->weights_buffer.get()) : user_weights;
    if (kind == kForward) {
      if (entry->reorder) entry->weights_reorder.execute(stream, user_weights, weights);
      entry->convolution.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, dst}});
    } else if (kind == kBackwardData) {
      if (entry->reorder) entry->weights_reorder.execute(stream, user_weights, weights);
      entry->convolution.execute(
          stream, {{DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DIFF_SRC, src}});
    } else {
      entry->convolution.execute(
          stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_DIFF_WEIGHTS, weights}});
      if (entry->reorder) entry->weights_reorder.execute(stream, weights, user_weights);
    }
    stream.wait();
  } catch (const dnnl::error& error) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution: ") + error.what());
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "oneDNN convolution: out of memory");
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y, ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> low, ffi::Span<const int64_t> high, ffi::Span<const int64_t> dilation, int64_t groups) {
  return Run(kForward, x, w, y, strides, low, high, dilation, groups);
}

ffi::Error BackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                        ffi::Span<const int64_t> strides, ffi::Span<const int64_t> low, ffi::Span<const int64_t> high,
                        ffi::Span<const int64_t> dilation, int64_t groups) {
  return Run(kBackwardData, dy, w, dx, strides, low, high, dilation, groups);
}

ffi::Error BackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                           ffi::Span<const int64_t> strides, ffi::Span<const int64_t> low,
                           ffi::Span<const int64_t> high, ffi::Span<const int64_t> dilation, int64_t groups) {
  return Run(kBackwardWeights, x, dy, dw, strides, low, high, dilation, groups);
}

}  // namespace

// Whether forward, backward-data and backward-weights of this convolution all have a direct oneDNN
// kernel: 1 yes, 0 no, -1 on an error (the message is not kept; the Python side then uses XLA's
// path). dtype: 0 float32, 1 bfloat16; shapes and attributes as the handlers take them. Builds and
// keeps the three primitives, so the first call of a traced program finds them ready.
extern "C" int boneage_onednn_conv_supported(int dtype, const int64_t* x, const int64_t* w, const int64_t* y,
                                             const int64_t* strides, const int64_t* low, const int64_t* high,
                                             const int64_t* dilation, int64_t groups) {
  if ((dtype != 0 && dtype != 1) || !GroupsFit(x, w, groups)) return 0;
  const auto type = dtype == 0 ? memory::data_type::f32 : memory::data_type::bf16;
  try {
    std::lock_guard<std::mutex> guard(Lock());
    for (Kind kind : {kForward, kBackwardData, kBackwardWeights}) {
      if (Lookup(kind, type, x, w, y, strides, low, high, dilation, groups) == nullptr) return 0;
    }
  } catch (...) {
    return -1;
  }
  return 1;
}

// Which oneDNN primitive and implementation runs one kind (0 forward, 1 backward data, 2 backward
// weights) of this convolution, e.g. "convolution brgconv_1x1:avx512_core" or "matmul brg:avx512_core",
// written to `out` (NUL-terminated, cut to `size`): 1 when there is one, 0 when there is no direct
// kernel, -1 on an error. For tests and for reading what a model runs.
extern "C" int boneage_onednn_conv_implementation(int kind, int dtype, const int64_t* x, const int64_t* w,
                                                  const int64_t* y, const int64_t* strides, const int64_t* low,
                                                  const int64_t* high, const int64_t* dilation, int64_t groups,
                                                  char* out, int size) {
  if (size < 1 || kind < kForward || kind > kBackwardWeights || (dtype != 0 && dtype != 1) ||
      !GroupsFit(x, w, groups)) return -1;
  out[0] = '\0';
  try {
    std::lock_guard<std::mutex> guard(Lock());
    Entry* entry = Lookup(static_cast<Kind>(kind), dtype == 0 ? memory::data_type::f32 : memory::data_type::bf16,
                          x, w, y, strides, low, high, dilation, groups);
    if (entry == nullptr) return 0;
    const std::string name = std::string(entry->matmul ? "matmul " : "convolution ") + entry->implementation;
    name.copy(out, size - 1);
    out[std::min<size_t>(name.size(), size - 1)] = '\0';
  } catch (...) {
    return -1;
  }
  return 1;
}

#define BONEAGE_CONV_BINDING                               \
  ffi::Ffi::Bind()                                         \
      .Arg<ffi::AnyBuffer>()                               \
      .Arg<ffi::AnyBuffer>()                               \
      .Ret<ffi::AnyBuffer>()                               \
      .Attr<ffi::Span<const int64_t>>("strides")           \
      .Attr<ffi::Span<const int64_t>>("padding_low")       \
      .Attr<ffi::Span<const int64_t>>("padding_high")      \
      .Attr<ffi::Span<const int64_t>>("dilation")          \
      .Attr<int64_t>("groups")

XLA_FFI_DEFINE_HANDLER_SYMBOL(boneage_onednn_conv_forward, Forward, BONEAGE_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(boneage_onednn_conv_backward_data, BackwardData, BONEAGE_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(boneage_onednn_conv_backward_weights, BackwardWeights, BONEAGE_CONV_BINDING);
