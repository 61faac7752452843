// Torch binding of the CUDA backend: the only file of csrc/cuda that includes torch. It
// normalises the small tensors (ids, rows, prompt, low-rank factors: O(B*s + m*d + L*r + r*d)),
// allocates outputs, and calls the raw-pointer launchers of launchers.h on the current
// stream. The big tensors (weight, hidden, grad_out, out) are used in place, never copied.
// The contract is dept_kernels/backends/_torch.py; the Python layer validates values.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "../common/forward_args.h"
#include "launchers.h"

namespace {

using dept_kernels::DType;

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "dept_kernels cuda ", what, ": ", cudaGetErrorString(err));
}

at::Tensor forward(const at::Tensor& input_ids, const at::Tensor& weight,
                   const std::optional<at::Tensor>& prompt,
                   const std::optional<at::Tensor>& lora_a,
                   const std::optional<at::Tensor>& lora_b, const std::optional<at::Tensor>& rows,
                   double scaling, const std::optional<at::Tensor>& task_ids,
                   const std::optional<at::Tensor>& batch_order,
                   const std::optional<at::Tensor>& visual) {
  check_cuda(weight, "weight");
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto t = dept_kernels::normalize_forward(input_ids, weight, prompt, lora_a, lora_b, rows,
                                                 task_ids, batch_order, visual);
  auto out = at::empty({t.batch, t.width(), t.d}, weight.options());
  if (out.numel() == 0) return out;
  using dept_kernels::ptr_or_null;
  dept_kernels::ForwardParams args{};
  args.ids = t.ids.data_ptr<int64_t>();
  args.weight = weight.data_ptr();
  args.weight_stride = weight.stride(0);
  args.prompt = t.prompt.defined() ? t.prompt.data_ptr() : nullptr;
  args.lora_a = ptr_or_null<float>(t.lora_a);
  args.lora_b = ptr_or_null<float>(t.lora_b);
  args.rows = ptr_or_null<int64_t>(t.rows);
  args.task_ids = ptr_or_null<int64_t>(t.task_ids);
  args.batch_order = ptr_or_null<int64_t>(t.batch_order);
  args.visual = t.visual.defined() ? t.visual.data_ptr() : nullptr;
  args.n_v = t.n_v;
  args.visual_stride_b = t.visual_stride_b;
  args.visual_stride_v = t.visual_stride_v;
  args.scaling = static_cast<float>(scaling);
  args.batch = t.batch;
  args.seq = t.seq;
  args.m = t.m;
  args.d = t.d;
  args.r = t.r;
  args.lora_rows = t.max_len;
  args.dtype = dtype_of(weight, "weight");
  args.out = out.data_ptr();
  check_launch(dept_kernels::dept_forward(args, current_stream()), "forward");
  return out;
}

at::Tensor reduce(const at::Tensor& grad_out, int64_t m, const std::optional<at::Tensor>& order,
                  const std::optional<at::Tensor>& offsets) {
  check_cuda(grad_out, "grad_out");
  dept_kernels::check_on(grad_out.device(), order, "order");
  dept_kernels::check_on(grad_out.device(), offsets, "offsets");
  // Rows per sample: m + s, or more when grad_out views the text columns of a wider output.
  const int64_t width = dept_kernels::grad_batch_rows(grad_out);
  TORCH_CHECK(order.has_value() == offsets.has_value(), "order and offsets go together");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t batch = grad_out.size(0);
  const int64_t seq = grad_out.size(1) - m;
  const int64_t d = grad_out.size(2);
  TORCH_CHECK(m >= 0 && seq >= 0, "m must lie in [0, m + s]");
  const auto longs = grad_out.options().dtype(at::kLong);
  // Both modes become one segmented sum over rows of grad_out viewed as (B * width, d):
  // src_rows lists the grad row of each token in segment order (O(B*s) integers).
  at::Tensor src_rows, off;
  if (order.has_value()) {
    const auto ord = order->to(at::kLong).contiguous();
    TORCH_CHECK(ord.numel() == batch * seq, "order must list all B*s tokens");
    off = offsets->to(at::kLong).contiguous();
    TORCH_CHECK(off.dim() == 1 && off.numel() >= 1, "offsets must be (R + 1,)");
    src_rows = seq > 0 ? ord.div(seq, "floor") * width + m + ord.remainder(seq) : ord;
  } else {
    // Segment t holds the tokens (b, t), b ascending: the batch sum in a fixed order.
    src_rows = (at::arange(seq, longs).unsqueeze(1) + m + at::arange(batch, longs) * width)
                   .reshape(-1)
                   .contiguous();
    off = at::arange(seq + 1, longs) * batch;
  }
  const int64_t segments = off.numel() - 1;
  const int64_t tokens = batch * seq;
  auto out = at::empty({segments, d}, grad_out.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  auto carry = at::empty({dept_kernels::segment_sum_carry_rows(tokens), d}, out.options());
  dept_kernels::SegmentSumArgs args{};
  args.grad = grad_out.data_ptr();
  args.dtype = dtype_of(grad_out, "grad_out");
  args.src_rows = src_rows.data_ptr<int64_t>();
  args.offsets = off.data_ptr<int64_t>();
  args.tokens = tokens;
  args.segments = segments;
  args.d = d;
  args.out = out.data_ptr<float>();
  args.carry = carry.data_ptr<float>();
  check_launch(dept_kernels::segment_sum(args, current_stream()), "reduce");
  return out;
}

at::Tensor gather_add(const at::Tensor& hidden, const at::Tensor& rows, const at::Tensor& table,
                      at::Tensor out) {
  check_cuda(hidden, "hidden");
  dept_kernels::check_on(hidden.device(), rows, "rows");
  dept_kernels::check_on(hidden.device(), table, "table");
  dept_kernels::check_on(hidden.device(), out, "out");
  TORCH_CHECK(hidden.dim() == 3 && hidden.is_contiguous(), "hidden must be contiguous (B, s, d)");
  TORCH_CHECK(out.sizes() == hidden.sizes() && out.is_contiguous() &&
                  out.scalar_type() == hidden.scalar_type(),
              "out must be a contiguous tensor like hidden");
  TORCH_CHECK(table.dim() == 2 && table.is_contiguous() && table.size(1) == hidden.size(2),
              "table must be a contiguous (R, d) tensor");
  TORCH_CHECK(rows.numel() == hidden.size(0) * hidden.size(1), "rows must be (B, s)");
  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto rows64 = rows.to(at::kLong).contiguous();
  dept_kernels::GatherAddArgs args{};
  args.hidden = hidden.data_ptr();
  args.dtype = dtype_of(hidden, "hidden");
  args.rows = rows64.data_ptr<int64_t>();
  args.table = table.data_ptr();
  args.table_dtype = dtype_of(table, "table");
  args.tokens = rows.numel();
  args.d = hidden.size(2);
  args.out = out.data_ptr();
  check_launch(dept_kernels::gather_add(args, current_stream()), "gather_add");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "DePT / AoT kernels, CUDA backend (see dept_kernels/backends/_cuda.py)";
  module.def("forward", &forward,
             "(B, m + s + n_v, d) fused prompt + embedding + low-rank delta (+ visual rows), "
             "optionally per task");
  module.def("reduce", &reduce, "fp32 batch / segment sums of the token rows of grad_out");
  module.def("gather_add", &gather_add, "out = hidden + table[rows], added in fp32");
}
