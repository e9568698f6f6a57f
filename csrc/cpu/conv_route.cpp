// conv family, CPU: the router (see conv_route.h), its policies and the family's kernel ops.
//
// Thresholds (all measured on this project's 2-core AVX-512 machine, fp32, 2 threads):
//   Gemm         benchmarks/bench_conv.py: the GEMM form wins while the GEMM's narrow side (output
//                or input pixels times batch) stays at or below kMaxColumns, for weights big enough
//                that reading them is the cost (conv 1x512x8x8 -> 4x4: 2.5x forward; transposed
//                1x1024x4x4: 2.4x forward+backward), and up to kMaxColumnsBigWeight for a plain
//                conv with a 4M+ element weight (16x512x8x8 -> 1024 channels: 1.1x forward, 1.3x
//                with backward); at 1024 columns it is 0.64x oneDNN (64x256x8x8). And up to
//                kMaxColumnsBigWeight for a plain conv onto a map of at most kSmallMap pixels with
//                kSmallMapChannels+ channels (SAGAN D's 8x256x8x8 -> 512, fwd+bwd, 1 thread, CPU time,
//                under load: 1.53-1.55x oneDNN; 16x256x8x8 (256 columns) 1.07-1.14x; 32x (512) 0.99x;
//                with more pixels oneDNN keeps it: 4x256x16x16 0.98x, 1x256x32x32 0.96x). Where this
//                conv's input is channels_last the NHWC rules below decide instead.
//                And any call of at most kTinyMacs multiply-adds (output columns times weight
//                elements): oneDNN's fixed cost per call (40-60 us forward, 220-300 us with backward)
//                is the whole cost there, the GEMM form's is 6-40 us (an ad-hoc sweep, not a
//                project benchmark; measured 2026-12-07, 1 and 2 threads, 4x4 stride 2: conv 1x4x4x4 -> 4
//                0.15x forward / 0.31x forward+backward, 1x16x16x16 -> 16 (2^18 MACs) 0.73x / 0.62x,
//                1x3x32x32 -> 16 0.78x / 0.54x, transposed 1x16x8x8 -> 16 0.41x / 0.43x; losses
//                from 2^19: 2x16x16x16 -> 16 1.41x forward, 1x3x64x64 -> 8 1.68x).
//                All of these for kernels of kMinTaps+ taps only (4x4 and up: see kMinTaps below), and
//                each bounded by the GEMM's shape (kRowsPerColumn, kTinyUnfold below).
//   Winograd4x4  benchmarks/bench_conv4x4.py: the engine's GEMMs are (K x Cv) @ (Cv x T) per
//                transform point, and the weight transforms (twice per training step, plus one
//                adjoint) cost about what the GEMMs cost at T ~ 100 tiles. Wins measured: PatchGAN's
//                256 -> 512 stride-1 layer at 32x32 (T = 256), the 64 -> 128 and 128 -> 256
//                stride-2 layers, the U-Net's 512 -> 128 and 256 -> 64 transposed layers; losses:
//                3-channel first layers (Cv = 12: the transforms of the 64-channel side dominate),
//                the 1-channel PatchGAN head, and maps of 16x16 outputs or fewer (T = 36 at batch
//                1: the U-Net's 256 -> 512 at 32x32 and its 1024 -> 256 transposed layer at 16x16:
//                0.37-0.76x in BENCHMARKS.md's run).
//   Winograd3x3  benchmarks/bench_conv3x3.py: Winograd pays off once the GEMMs dominate its
//                memory-bound transforms: F(2, 3) beats oneDNN's direct convolution from 128
//                input and output channels and 256 output tiles (2x2) per call.
//   Gemm, NHWC   the same GEMMs with pixels as rows, for channels_last inputs (nhwc_gemm_pays below).
// The Gemm rule is asked first, then Winograd4x4, then the NHWC Gemm rules; everything else is OneDNN.
#include "conv_route.h"

#include "conv_gemm.h"
#include "conv_lean.h"
#include "conv_winograd.h"
#include "conv_winograd3x3.h"

#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

namespace ganengine {
namespace conv_route {

namespace {

constexpr int64_t kMaxColumns = 64;
constexpr int64_t kMinWeight = 1 << 16;
constexpr int64_t kMaxColumnsBigWeight = 256;
constexpr int64_t kBigWeight = 1 << 22;
constexpr int64_t kTinyMacs = 1 << 18;
// The GEMM form unfolds one operand (im2col of a conv's input, col2im of a transposed conv's output:
// U = columns x w.size(1) x taps elements) and multiplies it with R = w.size(0) GEMM rows (a conv's
// output channels, a transposed conv's input channels). The rules above were measured on convs with
// many rows per column; with few, unfolding costs more than oneDNN saves. An ad-hoc interleaved
// sweep (routefix, 2026-12-08, 1 thread, thread time, medians; 808 random cases the old rules sent
// to the GEMM form, 4x4 and 3x3 kernels, plus 90 targeted ones; GEMM form / nn.Conv2d, forward /
// forward+backward): PatchGAN's head 512 -> 1 on 6x6 (R = 1) 2.2-2.9x / 1.4-2.5x; 64 -> 64, 4x4
// stride 2 from 4x4 maps, at batch 16 (64 columns) 1.3-1.6x / 1.2-1.5x, batch 8 (32) 1.15x / 1.3x,
// batch 4 (16 = R / 4) 1.08x / 0.83-0.93x, batch 1 0.76-0.88x; 128 -> 128 at 64 columns (batch 16
// from 4x4, batch 4 from 8x8) 1.0-1.24x / 1.1-1.2x, at 32 0.9-1.0x; 512 -> 64 4x4 stride 1 at 16
// columns 0.77x / 0.73-0.86x; 256 -> 512 from 8x8 at batch 16 (256 columns = R / 2) 1.22-1.25x
// forward. So the many-rows rules take columns <= R / kRowsPerColumn. The tiny-call rule is bounded
// by U: heads on <= 2^14 unfolded elements win (64 -> 1 on 4x4: 0.54x; 128 -> 1: 0.73x), from 2^15
// they lose (256 -> 8 on 4x4: 1.18x; 128 -> 2 on 6x6: 1.22x; 8 -> 2 from 12x12 at batch 8, U = 36864:
// 2.0x); transposed convs win to 2^15 (1 -> 64 from 4x4: 0.37x) and lose at 2^16 (64 -> 64 from 2x2
// at batch 16: 1.1-1.45x; 2 -> 128 from 6x6: 1.18x / 1.32x).
constexpr int64_t kRowsPerColumn = 4;
constexpr int64_t kTinyUnfold = 1 << 14, kTinyUnfoldTransposed = 1 << 15;
// Every rule above and the NHWC rules below were measured on 4x4 (and 7x7) kernels, where oneDNN's
// fixed cost per call is high (80-250 us forward, 450-1100 us with backward, 1 thread). For 1x1,
// 2x2 and 3x3 kernels it is low (20-60 us / 150-400 us) and the GEMM form loses at every small
// size measured (an ad-hoc interleaved sweep of ganengine.nn.Conv2d under both policies, 2026-12-07, 1 thread, thread time,
// GEMM form / oneDNN, forward and forward+backward: 1x1 8 -> 8 at 8x8 1.64x / 1.24x, 256 -> 256
// at 8x8 1.58x / 1.25x; 2x2 stride 2 16 -> 16 at 8x8 1.50x / 1.23x; 3x3 8 -> 8 at 8x8 1.24x /
// 1.22x, 128 -> 128 at 8x8 1.35x / 1.15x, transposed 16 -> 16 1.09x / 1.03x; channels_last 3x3
// 64 -> 64 at 8x8 batch 4 1.68x / 1.27x; against 4x4 stride 2 8 -> 8 at 8x8 0.43x / 0.53x, 5x5
// 8 -> 8 0.74x / 0.57x, 7x7 3 -> 8 0.66x / 0.56x). So kernels of fewer than kMinTaps taps run
// oneDNN. (A 3x3 kernel with a 2^19+ element weight on at most 64 columns took the GEMM form until
// 2026-12-08 for its forward+backward; it lost in forward: the routefix sweep, 1 thread, GEMM form /
// nn.Conv2d, forward / forward+backward: 256 -> 512 onto 4x4 at batch 4 1.31x / 1.07x, stride 2
// 512 -> 256 from 1x1 at batch 8 1.5-2.0x / 0.86x, 256 -> 512 from 4x4 at batch 2 1.4-1.8x / 0.88x.)
// Nor 2x2 (a 2x2 stride-2 1024 -> 256 at 8x8, batch 4, lost in forward: 1.08-1.13x, the review's
// measurement), nor 1x1: oneDNN's 1x1 conv is itself one GEMM.
constexpr int64_t kMinTaps = 16;

// The NHWC form (channels_last x, conv_gemm.cpp) against oneDNN on channels_last, 4x4 stride 2
// padding 1, fwd+bwd, 1 thread, CPU time, interleaved, under load (benchmarks/bench_conv.py
// --shapes dcgan --layout channels_last --threads 1 --cpu-time): with P the small map's pixels
// per image (conv output, transposed input), N * P the GEMM rows,
//   * N * P <= 256, any channels: DCGAN at --quick's widths, batch 4: conv 16 -> 32 (P = 64)
//     1.33x, 32 -> 64 (P = 16) 1.62x, transposed 64 -> 32 (P = 16) 1.91x, 32 -> 16 (P = 64) 1.50x;
//     at the reference widths, batch 4: conv 128 -> 256 (P = 64) 1.18x, transposed 256 -> 128 1.27x;
//   * P <= 16 with 256+ channels on both sides, any batch: DCGAN's 256 -> 512 conv (8x8 -> 4x4)
//     and 512 -> 256 transposed conv (4x4 -> 8x8): 1.51x / 1.57x at batch 64, 1.72x / 1.89x at 16,
//     3.5x / 3.6x at 4;
//   * transposed with at most 16 channels on one side, N * P <= 1024: 16 -> 8 from 16x16 at batch 4
//     1.25x (oneDNN's transposed conv blocks channels by 16);
//   * transposed onto at most 4 channels from 64+ (a generator's image layer): 64 -> 3 from 32x32
//     1.10-1.12x at batch 64, 1.31x at 16; 128 -> 3 at 16 1.54x; 64 -> 1 at 64 1.65x (losses: 32 -> 3
//     at 64 0.90x, 64 -> 8 at 16 0.86x);
//   * (4x4 stride 1, no padding) D's last conv 512 -> 1 on the 4x4 map: 1.15x at batch 64, 64 -> 1 at
//     batch 4 2.41x; G's first transposed conv on the 1x1 input (NHWC-dense and NCHW-contiguous at
//     once: the NCHW form runs it) 100 -> 512 at batch 64 1.53x, 16 -> 64 at batch 4 1.49x;
// losses: batch 64, P = 64: conv 128 -> 256 0.64x, transposed 256 -> 128 0.80x; P = 256: 0.39x / 0.45x;
// batch 4: conv 64 -> 128 from 32x32 (N * P = 1024) 0.64x, conv 8 -> 16 from 32x32 0.99x,
// transposed 8 -> 3 from 32x32 (N * P = 4096) 0.96x. Asked only where Winograd 4x4 does not take
// the call (its wins are measured against oneDNN, not this form).
constexpr int64_t kNhwcMaxColumns = 256;
constexpr int64_t kSmallMap = 16, kSmallMapChannels = 256;
constexpr int64_t kNhwcNarrowChannels = 16, kNhwcNarrowMaxColumns = 1024;
constexpr int64_t kNhwcImageChannels = 4, kNhwcImageMinInput = 64;
bool nhwc_gemm_pays(int64_t cols, int64_t pixels, int64_t c_in, int64_t c_out, bool transposed) {
  const int64_t channels = std::min(c_in, c_out);
  if (cols <= kNhwcMaxColumns) return true;
  if (pixels <= kSmallMap && channels >= kSmallMapChannels) return true;
  if (transposed && c_out <= kNhwcImageChannels && c_in >= kNhwcImageMinInput) return true;
  return transposed && channels <= kNhwcNarrowChannels && cols <= kNhwcNarrowMaxColumns;
}
constexpr int64_t kWinograd4x4MinChannels = 64;  // K and C * stride^2
constexpr int64_t kWinograd4x4MinTiles = 100;
constexpr int64_t kWinograd3x3MinTiles = 256;
const std::vector<int64_t> kDil{1, 1};

// the fallback for an unset or unparsable value (ganengine/settings.py validates every GANENGINE_*
// variable and reports a bad one in one line; a throw from a static initialiser would surface as a
// traceback at the first convolution instead)
int64_t env_int(const char* name, int64_t fallback) {
  const char* e = std::getenv(name);
  if (!e || !*e) return fallback;
  char* end = nullptr;
  const long long v = std::strtoll(e, &end, 10);
  return (end && *end == '\0') ? static_cast<int64_t>(v) : fallback;
}

void check_policy(int64_t p, const char* what) {
  TORCH_CHECK(p >= 0 && p <= 2, "ganengine conv ", what, ": policy must be 0 (auto), 1 (always) or 2 (never), got ",
              p);
}

std::atomic<int64_t>& gemm_policy_ref() {
  static std::atomic<int64_t> p{policy_from_env("GANENGINE_CONV_GEMM")};
  return p;
}

void check_config(const Winograd4x4Config& c) {
  check_policy(c.policy, "winograd");
  TORCH_CHECK(c.s1_tile == 2 || c.s1_tile == 3, "ganengine conv winograd: the stride-1 tile must be 2 or 3, got ",
              c.s1_tile);
  TORCH_CHECK(c.s2_tile >= 2 && c.s2_tile <= 4, "ganengine conv winograd: the stride-2 tile must be 2, 3 or 4, got ",
              c.s2_tile);
}

std::mutex& config_mutex() {
  static std::mutex m;
  return m;
}
Winograd4x4Config& winograd4x4_ref() {
  static Winograd4x4Config c = [] {
    Winograd4x4Config d{policy_from_env("GANENGINE_CONV_WINOGRAD"), env_int("GANENGINE_WINOGRAD_S1_TILE", 2),
                        env_int("GANENGINE_WINOGRAD_S2_TILE", 3)};
    if (d.s1_tile != 2 && d.s1_tile != 3) d.s1_tile = 2;  // (out of range: the default, as above)
    if (d.s2_tile < 2 || d.s2_tile > 4) d.s2_tile = 3;
    return d;
  }();
  return c;
}

std::atomic<int64_t>& min_channels_ref() {
  static std::atomic<int64_t> v{[] {
    const int64_t m = env_int("GANENGINE_WINOGRAD_MIN_CHANNELS", 128);
    return m < 0 ? int64_t{128} : m;
  }()};
  return v;
}
std::atomic<int64_t>& min_tiles_ref() {
  static std::atomic<int64_t> v{kWinograd3x3MinTiles};
  return v;
}

// whether the GEMM form's unfolded matrix (cols x w.size(1) x taps elements) is tiny (see kRowsPerColumn)
bool tiny_unfold(int64_t cols, const at::Tensor& w, bool transposed) {
  return cols * w.size(1) * w.size(2) * w.size(3) <= (transposed ? kTinyUnfoldTransposed : kTinyUnfold);
}

bool use_gemm(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
              bool transposed) {
  const int64_t pol = gemm_policy();
  if (pol == 2 || !conv_gemm::legal(x, w, transposed)) return false;
  if (pol == 1) return true;
  const int64_t taps = w.size(2) * w.size(3);
  if (taps < kMinTaps) return false;  // (oneDNN's fixed cost is low for these kernels: see kMinTaps)
  const int64_t cols = conv_gemm::columns(x, w, stride, padding, transposed);
  const bool many_rows = cols * kRowsPerColumn <= w.size(0);  // (see kRowsPerColumn)
  if (cols <= kMaxColumns && w.numel() >= kMinWeight && many_rows) return true;
  // (oneDNN's fixed cost is the whole cost there; the unfolded bound was swept on the NCHW form only)
  if (cols * w.numel() <= kTinyMacs && (conv_gemm::nhwc_form(x) || tiny_unfold(cols, w, transposed))) return true;
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) return false;  // (use_gemm_nhwc, after Winograd's)
  if (cols <= kMaxColumns || transposed || cols > kMaxColumnsBigWeight || !many_rows) return false;
  return w.numel() >= kBigWeight ||
         (cols / x.size(0) <= kSmallMap && std::min(w.size(0), w.size(1)) >= kSmallMapChannels);
}

// the NHWC rules (nhwc_gemm_pays), asked after Winograd 4x4's, for inputs the NHWC form runs (a
// channels_last x) and 1x1 maps (both layouts at once; measured there: G's first transposed conv).
// A one-channel x on a bigger map is both layouts too but runs the NCHW form, which these rules were
// not measured on: there they hold only within the NCHW bounds (kRowsPerColumn, kTinyUnfold; the
// routefix sweep: transposed 1 -> 64 from 6x6 at batch 16, 576 columns: 1.25x / 1.6-2.0x nn.Conv2d;
// conv 1 -> 128 on 16x16, 169 columns, 2704 unfolded elements: 0.44x / 0.57-0.69x).
bool use_gemm_nhwc(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                   bool transposed) {
  if (gemm_policy() != 0 || !conv_gemm::legal(x, w, transposed) || !x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return false;
  if (w.size(2) * w.size(3) < kMinTaps) return false;  // (measured on 4x4 kernels only: see kMinTaps)
  const int64_t cols = conv_gemm::columns(x, w, stride, padding, transposed);
  if (!conv_gemm::nhwc_form(x) && x.size(2) * x.size(3) != 1 && cols * kRowsPerColumn > w.size(0) &&
      !tiny_unfold(cols, w, transposed))
    return false;
  const int64_t c_in = transposed ? w.size(0) : w.size(1), c_out = transposed ? w.size(1) : w.size(0);
  return nhwc_gemm_pays(cols, cols / x.size(0), c_in, c_out, transposed);
}

// Stride 2 on small maps: P = the per-image pixels of the smaller side (a conv's output, a
// transposed conv's input). The tile count alone let batch carry small maps over kWinograd4x4MinTiles,
// where oneDNN's direct conv (which blocks over the batch too) wins. Measured 2026-12-06, fwd+bwd,
// 1 thread, process_time, interleaved, GF.conv2d / conv_transpose2d with winograd_policy forced,
// Winograd vs oneDNN: conv 64 -> 128 from 32x32 (P = 256) at N = 4 / 8 / 16 / 32: 0.94-1.01x /
// 1.03-1.16x / 0.81-0.84x / 0.84x; conv 128 -> 256 from 16x16 (P = 64), N = 8: 0.79-0.82x;
// transposed 256 -> 128 from 8x8 (P = 64), N = 8: 0.81x; transposed 512 -> 256 from 16x16 (P = 256),
// N = 4: 1.11x; conv 128 -> 256 from 64x64 (P = 1024), N = 1 / 4: 1.23-1.30x / 1.54x. Stride 1 is
// not limited: 256 -> 512 at 16x16, N = 8 (P = 169): 1.40x. N = 8 at P = 256 was 1.03-1.16x as a
// plain conv but 0.91x inside SAGAN D's fused conv + LeakyReLU (bench_fuse --layers, 12.95 -> 14.24
// ms): oneDNN there, Winograd up to N x P = 1024.
constexpr int64_t kWinogradS2MinMap = 256;     // P below this: oneDNN
constexpr int64_t kWinogradS2LargeMap = 1024;  // P from this: any batch
constexpr int64_t kWinogradS2MaxPixels = 1024; // between the two: N * P up to this
bool small_map_pays_stride2(const at::Tensor& x, at::IntArrayRef padding, bool transposed,
                            at::IntArrayRef output_padding) {
  const int64_t hi = x.size(2), wi = x.size(3);
  const int64_t ph = padding[0], pw = padding[padding.size() > 1 ? 1 : 0];
  int64_t ho, wo;
  if (transposed) {
    const int64_t oph = output_padding.empty() ? 0 : output_padding[0];
    const int64_t opw = output_padding.size() > 1 ? output_padding[1] : oph;
    ho = (hi - 1) * 2 - 2 * ph + 4 + oph;
    wo = (wi - 1) * 2 - 2 * pw + 4 + opw;
  } else {
    ho = (hi + 2 * ph - 4) / 2 + 1;
    wo = (wi + 2 * pw - 4) / 2 + 1;
  }
  const int64_t p = std::min(hi * wi, ho * wo);
  if (p < kWinogradS2MinMap) return false;
  return p >= kWinogradS2LargeMap || x.size(0) * p <= kWinogradS2MaxPixels;
}

// the Winograd 4x4 tile for this call, or 0 where Winograd 4x4 does not take it
int64_t winograd4x4_tile(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                         bool transposed, at::IntArrayRef output_padding) {
  const Winograd4x4Config c = winograd4x4_config();
  if (c.policy == 2 || !conv_winograd::legal(x, w, stride, padding, transposed, output_padding)) return 0;
  const int64_t tile = stride[0] == 2 ? c.s2_tile : c.s1_tile;
  if (c.policy == 1) return tile;
  const int64_t K = w.size(0), Cv = w.size(1) * stride[0] * stride[0];  // (transposed: w is the engine conv's)
  if (K < kWinograd4x4MinChannels || Cv < kWinograd4x4MinChannels) return 0;
  if (stride[0] == 2 && !small_map_pays_stride2(x, padding, transposed, output_padding)) return 0;
  return conv_winograd::tiles(x, w, stride, padding, transposed, output_padding, tile) >= kWinograd4x4MinTiles ? tile
                                                                                                              : 0;
}

// Whether the rules below all say oneDNN for this weight, whatever the input: a kernel of fewer than
// kMinTaps taps (1x1, 2x2, 3x3: SAGAN's and BigGAN's convs), unless the GEMM policy is "always"
// (use_gemm's only other way in; Winograd 4x4 takes 4x4 kernels only, the NHWC rules kMinTaps+
// taps only). Asked first, so
// these calls skip the rules' checks and the Winograd configuration's lock (at a tiny shape the
// decision was part of what is compared with eager, host_cost's conv_small_kernels).
bool small_kernel_onednn(const at::Tensor& w) {
  if (w.dim() != 4) return false;
  const int64_t taps = w.size(2) * w.size(3);
  if (taps >= kMinTaps) return false;
  return gemm_policy_ref().load(std::memory_order_relaxed) != 1;
}

}  // namespace

// auto / always / never (any case); anything else is auto here (settings.py reports it)
int64_t policy_from_env(const char* var) {
  const char* e = std::getenv(var);
  if (!e) return 0;
  std::string s(e);
  for (auto& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (s == "always") return 1;
  if (s == "never") return 2;
  return 0;
}

int64_t gemm_policy() { return gemm_policy_ref().load(); }
void set_gemm_policy(int64_t p) {
  check_policy(p, "gemm");
  gemm_policy_ref().store(p);
}

Winograd4x4Config winograd4x4_config() {
  std::lock_guard<std::mutex> lock(config_mutex());
  return winograd4x4_ref();
}
void set_winograd4x4_config(const Winograd4x4Config& c) {
  check_config(c);
  std::lock_guard<std::mutex> lock(config_mutex());
  winograd4x4_ref() = c;
}

Winograd3x3Config winograd3x3_config() { return {min_channels_ref().load(), min_tiles_ref().load()}; }
void set_winograd3x3_config(const Winograd3x3Config& c) {
  TORCH_CHECK(c.min_channels >= 0 && c.min_tiles >= 0, "ganengine conv3x3: min_channels and min_tiles must be >= 0, "
              "got ", c.min_channels, " and ", c.min_tiles);
  min_channels_ref().store(c.min_channels);
  min_tiles_ref().store(c.min_tiles);
}

int64_t winograd3x3_tile() { return env_int("GANENGINE_WINOGRAD_TILE", 2) == 4 ? 4 : 2; }

Decision decide(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                bool transposed, at::IntArrayRef output_padding) {
  if (small_kernel_onednn(w)) return {Route::OneDNN, 0};
  if (use_gemm(x, w, stride, padding, transposed)) return {Route::Gemm, 0};
  const int64_t tile = winograd4x4_tile(x, w, stride, padding, transposed, output_padding);
  if (tile > 0) return {Route::Winograd4x4, tile};
  if (use_gemm_nhwc(x, w, stride, padding, transposed)) return {Route::Gemm, 0};
  return {Route::OneDNN, 0};
}

bool winograd3x3_pays(int64_t n, int64_t c, int64_t h, int64_t w, int64_t k, int64_t padding, int64_t tile) {
  const Winograd3x3Config cfg = winograd3x3_config();
  return std::min(c, k) >= cfg.min_channels && conv_winograd3x3::tiles(n, h, w, padding, tile) >= cfg.min_tiles;
}

Decision decide3x3(const at::Tensor& x, const at::Tensor& w, int64_t padding, int64_t tile) {
  if (!(x.device().is_cpu() && x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.dim() == 4 &&
        w.dim() == 4))
    return {Route::OneDNN, 0};
  if (std::min(x.size(1), w.size(0)) < winograd3x3_config().min_channels) return {Route::OneDNN, 0};  // (no getenv)
  if (tile <= 0) tile = winograd3x3_tile();
  if (!winograd3x3_pays(x.size(0), x.size(1), x.size(2), x.size(3), w.size(0), padding, tile))
    return {Route::OneDNN, 0};
  return {Route::Winograd3x3, tile};
}

at::Tensor convolution(const Decision& d, const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                       at::IntArrayRef stride, at::IntArrayRef padding, bool transposed,
                       at::IntArrayRef output_padding) {
  switch (d.route) {
    case Route::Gemm:  // (the GEMM forms' views: standard strides, conv_lean.h to_format)
      return conv_common::to_format(conv_gemm::run(x, w, b, stride, padding, transposed, output_padding),
                                    conv_common::out_format(x));
    case Route::Winograd4x4:
      return conv_winograd::run(x, w, b, stride, padding, transposed, output_padding, d.tile);
    default:
      TORCH_CHECK(d.route == Route::OneDNN, "ganengine conv: route ", static_cast<int64_t>(d.route),
                  " is not one of conv's (0 oneDNN, 1 GEMM, 2 Winograd 4x4)");
      return at::convolution(x, w, b, stride, padding, kDil, transposed, output_padding, 1);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> convolution_backward(
    const Decision& d, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
    at::IntArrayRef padding, bool transposed, at::IntArrayRef output_padding, std::array<bool, 3> mask) {
  switch (d.route) {
    case Route::Gemm: {
      auto r = conv_gemm::run_backward(grad, x, w, stride, padding, transposed, mask);
      if (mask[0]) std::get<0>(r) = conv_common::to_format(std::get<0>(r), conv_common::out_format(x));
      if (mask[1]) std::get<1>(r) = conv_common::to_format(std::get<1>(r), at::MemoryFormat::Contiguous);
      return r;
    }
    case Route::Winograd4x4:
      return conv_winograd::run_backward(grad, x, w, stride, padding, transposed, output_padding, mask, d.tile);
    default: {
      TORCH_CHECK(d.route == Route::OneDNN, "ganengine conv: route ", static_cast<int64_t>(d.route),
                  " is not one of conv's (0 oneDNN, 1 GEMM, 2 Winograd 4x4)");
      const std::vector<int64_t> bias_sizes{transposed ? w.size(1) : w.size(0)};
      return at::convolution_backward(grad, x, w, bias_sizes, stride, padding, kDil, transposed, output_padding, 1,
                                      mask);
    }
  }
}

}  // namespace conv_route

// the routed convolution under the names conv_act.cpp calls (conv_gemm.h)
namespace conv_gemm {
at::Tensor convolution(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                       at::IntArrayRef stride, at::IntArrayRef padding, bool transposed,
                       at::IntArrayRef output_padding) {
  const auto d = conv_route::decide(x, w, stride, padding, transposed, output_padding);
  return conv_route::convolution(d, x, w, b, stride, padding, transposed, output_padding);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> convolution_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
    at::IntArrayRef padding, bool transposed, at::IntArrayRef output_padding, std::array<bool, 3> mask) {
  const auto d = conv_route::decide(x, w, stride, padding, transposed, output_padding);
  return conv_route::convolution_backward(d, grad, x, w, stride, padding, transposed, output_padding, mask);
}
}  // namespace conv_gemm
}  // namespace ganengine

// ----------------------------------------------------------------------------- the family's kernel ops
namespace {

using namespace ganengine;
using conv_route::Decision;
using conv_route::Route;

void check_args(const char* fn, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef output_padding, bool transposed) {
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4, "ganengine ", fn, ": x and weight must be 4-d, got ", x.sizes(),
              " and ", w.sizes());
  TORCH_CHECK(w.size(transposed ? 0 : 1) == x.size(1), "ganengine ", fn, ": weight ", w.sizes(),
              " does not take ", x.size(1), " input channels");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && output_padding.size() == 2, "ganengine ", fn,
              ": stride, padding and output_padding must have 2 entries");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "ganengine ", fn, ": x is ", x.scalar_type(), " but weight is ",
              w.scalar_type());
}

// route < 0: the router decides; else the route (and tile) a caller decided before (the lean
// entry, conv_autograd.cpp, decides once per call and passes its decision to the backward)
Decision decision_of(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                     bool transposed, at::IntArrayRef output_padding, int64_t route, int64_t tile) {
  if (route < 0) return conv_route::decide(x, w, stride, padding, transposed, output_padding);
  TORCH_CHECK(route <= 2, "ganengine conv: route must be -1 (decide), 0 (oneDNN), 1 (GEMM) or 2 (Winograd 4x4), got ",
              route);
  return {static_cast<Route>(route), tile};
}

at::Tensor conv_fwd_op(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                       bool transposed, int64_t route, int64_t tile) {
  check_args("conv_fwd", x, w, stride, padding, output_padding, transposed);
  const Decision d = decision_of(x, w, stride, padding, transposed, output_padding, route, tile);
  return conv_route::convolution(d, x, w, b, stride, padding, transposed, output_padding);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bwd_op(const at::Tensor& grad, const at::Tensor& x,
                                                           const at::Tensor& w, at::IntArrayRef stride,
                                                           at::IntArrayRef padding, at::IntArrayRef output_padding,
                                                           bool transposed, at::IntArrayRef mask, int64_t route,
                                                           int64_t tile) {
  check_args("conv_bwd", x, w, stride, padding, output_padding, transposed);
  TORCH_CHECK(mask.size() == 3, "ganengine conv_bwd: output mask must have 3 entries");
  std::array<bool, 3> m{mask[0] != 0, mask[1] != 0, mask[2] != 0};
  const Decision d = decision_of(x, w, stride, padding, transposed, output_padding, route, tile);
  auto r = conv_route::convolution_backward(d, grad, x, w, stride, padding, transposed, output_padding, m);
  auto fill = [](at::Tensor t, const at::Tensor& like) { return t.defined() ? t : at::empty({0}, like.options()); };
  return {fill(std::get<0>(r), x), fill(std::get<1>(r), w), fill(std::get<2>(r), grad)};
}

bool conv_uses_winograd_op(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                           at::IntArrayRef padding, bool transposed, at::IntArrayRef output_padding) {
  return conv_route::decide(x, w, stride, padding, transposed, output_padding).route == Route::Winograd4x4;
}

bool conv_uses_gemm_op(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                       bool transposed) {
  // (output_padding {0, 0}: only a Winograd decision, which the NHWC Gemm rules defer to, reads it)
  return conv_route::decide(x, w, stride, padding, transposed, {0, 0}).route == Route::Gemm;
}

// sets the Winograd 4x4 configuration (policy 0 auto / 1 always / 2 never, stride-1 tile,
// stride-2 tile; a negative entry keeps that one); returns the previous one
std::vector<int64_t> conv_winograd_config_op(int64_t policy, int64_t s1_tile, int64_t s2_tile) {
  const auto prev = conv_route::winograd4x4_config();
  auto c = prev;
  if (policy >= 0) c.policy = policy;
  if (s1_tile >= 0) c.s1_tile = s1_tile;
  if (s2_tile >= 0) c.s2_tile = s2_tile;
  conv_route::set_winograd4x4_config(c);
  return {prev.policy, prev.s1_tile, prev.s2_tile};
}

// sets the GEMM policy (0 auto, 1 always, 2 never; -1 only reads it); returns the previous one
int64_t conv_gemm_policy_op(int64_t p) {
  const int64_t prev = conv_route::gemm_policy();
  if (p >= 0) conv_route::set_gemm_policy(p);
  return prev;
}

// [route, tile] of conv2d / conv_transpose2d for this call (route: 0 oneDNN, 1 GEMM, 2 Winograd 4x4)
std::vector<int64_t> conv_route_op(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                                   at::IntArrayRef padding, bool transposed, at::IntArrayRef output_padding) {
  const Decision d = conv_route::decide(x, w, stride, padding, transposed, output_padding);
  return {static_cast<int64_t>(d.route), d.tile};
}

// whether Winograd F(tile, 3) pays for an fp32 conv3x3 of these shapes (the router's rule, for
// callers without tensors: ganengine.ops.conv3x3.winograd_profitable)
bool conv3x3_winograd_pays_op(at::IntArrayRef x_shape, at::IntArrayRef w_shape, int64_t padding, int64_t tile) {
  TORCH_CHECK(x_shape.size() == 4 && w_shape.size() == 4, "ganengine conv3x3: shapes must have 4 entries, got ",
              x_shape, " and ", w_shape);
  TORCH_CHECK(tile == 2 || tile == 4, "ganengine conv3x3: tile must be 2 or 4, got ", tile);
  return conv_route::winograd3x3_pays(x_shape[0], x_shape[1], x_shape[2], x_shape[3], w_shape[0], padding, tile);
}

// sets the Winograd 3x3 thresholds (a negative entry keeps that one); returns the previous ones
std::vector<int64_t> conv3x3_winograd_config_op(int64_t min_channels, int64_t min_tiles) {
  const auto prev = conv_route::winograd3x3_config();
  auto c = prev;
  if (min_channels >= 0) c.min_channels = min_channels;
  if (min_tiles >= 0) c.min_tiles = min_tiles;
  conv_route::set_winograd3x3_config(c);
  return {prev.min_channels, prev.min_tiles};
}

// the Winograd 3x3 tile conv3x3 runs this call with, 0 for oneDNN (tile > 0: decide as if
// GANENGINE_WINOGRAD_TILE were that)
int64_t conv3x3_route_op(const at::Tensor& x, const at::Tensor& w, int64_t padding, int64_t tile) {
  const Decision d = conv_route::decide3x3(x, w, padding, tile);
  return d.route == Route::Winograd3x3 ? d.tile : 0;
}

at::Tensor conv3x3_fwd_op(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                          int64_t pad, bool reflect, int64_t tile) {
  return conv_winograd3x3::run(x, w, bias, pad, reflect, tile);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv3x3_bwd_op(const at::Tensor& grad, const at::Tensor& x,
                                                              const at::Tensor& w, int64_t pad, bool reflect,
                                                              int64_t tile, at::IntArrayRef mask) {
  return conv_winograd3x3::run_backward(grad, x, w, pad, reflect, tile, mask);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ganengine_C, m) {
  m.def("conv_fwd(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] output_padding, "
        "bool transposed, int route=-1, int tile=0) -> Tensor");
  m.def("conv_bwd(Tensor grad, Tensor x, Tensor weight, int[] stride, int[] padding, int[] output_padding, "
        "bool transposed, int[] mask, int route=-1, int tile=0) -> (Tensor, Tensor, Tensor)");
  m.def("conv_uses_gemm(Tensor x, Tensor weight, int[] stride, int[] padding, bool transposed) -> bool");
  m.def("conv_gemm_policy(int policy) -> int", &conv_gemm_policy_op);
  m.def("conv_uses_winograd(Tensor x, Tensor weight, int[] stride, int[] padding, bool transposed, "
        "int[] output_padding) -> bool");
  m.def("conv_winograd_config(int policy, int s1_tile, int s2_tile) -> int[]", &conv_winograd_config_op);
  m.def("conv3x3_fwd(Tensor x, Tensor weight, Tensor? bias, int padding, bool reflect, int tile) -> Tensor");
  m.def("conv3x3_bwd(Tensor grad, Tensor x, Tensor weight, int padding, bool reflect, int tile, int[] mask) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("conv3x3_route(Tensor x, Tensor weight, int padding, int tile=0) -> int");
  m.def("conv_route(Tensor x, Tensor weight, int[] stride, int[] padding, bool transposed, int[] output_padding) "
        "-> int[]");
  m.def("conv3x3_winograd_config(int min_channels, int min_tiles) -> int[]", &conv3x3_winograd_config_op);
  m.def("conv3x3_winograd_pays(int[] x_shape, int[] w_shape, int padding, int tile) -> bool",
        &conv3x3_winograd_pays_op);
}

TORCH_LIBRARY_IMPL(ganengine_C, CPU, m) {
  m.impl("conv_fwd", &conv_fwd_op);
  m.impl("conv_bwd", &conv_bwd_op);
  m.impl("conv_uses_gemm", &conv_uses_gemm_op);
  m.impl("conv_uses_winograd", &conv_uses_winograd_op);
  m.impl("conv3x3_fwd", &conv3x3_fwd_op);
  m.impl("conv3x3_bwd", &conv3x3_bwd_op);
  m.impl("conv3x3_route", &conv3x3_route_op);
  m.impl("conv_route", &conv_route_op);
}
