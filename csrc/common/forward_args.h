// The DePT forward's arguments as both torch bindings (cpu, cuda) hand them to kernels:
// checked as a last line of defence (the Python layer validates first), ids and row
// indices as contiguous int64, the prompt in the table's dtype, the low-rank factors in
// fp32. These are the small tensors (O(B*s + T*(m*d + L*r + r*d))); the table is used in
// place. Converting also materialises stride-0 broadcast prompts. The visual rows are used
// in place through their strides (copied only when their last stride is not 1).
#pragma once

#include <torch/extension.h>

#include <optional>

namespace dept_kernels {

struct ForwardTensors {
  at::Tensor ids, prompt, lora_a, lora_b, rows, task_ids, batch_order;  // undefined: absent
  at::Tensor visual;  // (B, n_v, d) of the table's dtype, unit last stride; undefined: n_v = 0
  int64_t batch = 0, seq = 0, d = 0, m = 0, r = 0, max_len = 0;
  int64_t n_v = 0, visual_stride_b = 0, visual_stride_v = 0;
  // Rows per sample of the output: prompt, tokens, visual.
  int64_t width() const { return m + seq + n_v; }
};

// The kernels read every tensor through raw pointers, so each must live where the kernel
// runs: a CUDA pointer read on the host (or a host pointer on the GPU) is a crash, not an
// error. The Python ops check devices first; this covers a custom op called directly.
inline void check_on(const at::Device& device, const at::Tensor& t, const char* name) {
  TORCH_CHECK(!t.defined() || t.device() == device, name, " must be on ", device, ", got ",
              t.device());
}

inline void check_on(const at::Device& device, const std::optional<at::Tensor>& t,
                     const char* name) {
  if (t.has_value()) check_on(device, *t, name);
}

inline ForwardTensors normalize_forward(
    const at::Tensor& input_ids,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& prompt,
    const std::optional<at::Tensor>& lora_a,
    const std::optional<at::Tensor>& lora_b,
    const std::optional<at::Tensor>& rows,
    const std::optional<at::Tensor>& task_ids,
    const std::optional<at::Tensor>& batch_order,
    const std::optional<at::Tensor>& visual) {
  TORCH_CHECK(input_ids.dim() == 2 && weight.dim() == 2, "input_ids and weight must be 2-D");
  const auto device = weight.device();
  check_on(device, input_ids, "input_ids");
  check_on(device, prompt, "prompt");
  check_on(device, lora_a, "lora_a");
  check_on(device, lora_b, "lora_b");
  check_on(device, rows, "rows");
  check_on(device, task_ids, "task_ids");
  check_on(device, batch_order, "batch_order");
  check_on(device, visual, "visual");
  TORCH_CHECK(weight.stride(1) == 1, "weight must have unit last stride");
  TORCH_CHECK(lora_a.has_value() == lora_b.has_value(), "lora_a and lora_b go together");
  TORCH_CHECK(task_ids.has_value() == batch_order.has_value(),
              "task_ids and batch_order go together");
  ForwardTensors t;
  t.batch = input_ids.size(0);
  t.seq = input_ids.size(1);
  t.d = weight.size(1);
  // Per-task parameters carry a leading T dim.
  const int64_t pdim = task_ids.has_value() ? 3 : 2;
  t.m = prompt.has_value() ? prompt->size(-2) : 0;
  t.ids = input_ids.to(at::kLong).contiguous();
  if (task_ids.has_value()) {
    TORCH_CHECK(task_ids->dim() == 1 && task_ids->size(0) == t.batch &&
                    batch_order->sizes() == task_ids->sizes(),
                "task_ids and batch_order must be (B,)");
    t.task_ids = task_ids->to(at::kLong).contiguous();
    t.batch_order = batch_order->to(at::kLong).contiguous();
  }
  if (t.m > 0) {
    TORCH_CHECK(prompt->dim() == pdim && prompt->size(-1) == t.d,
                "prompt must be (m, d), or (T, m, d) with task_ids");
    t.prompt = prompt->to(weight.scalar_type()).contiguous();
  }
  if (lora_a.has_value()) {
    TORCH_CHECK(lora_a->dim() == pdim && lora_b->dim() == pdim,
                "lora_a and lora_b must be 2-D, or 3-D with task_ids");
    t.r = lora_a->size(-1);
    t.max_len = lora_a->size(-2);
    TORCH_CHECK(lora_b->size(-2) == t.r && lora_b->size(-1) == t.d &&
                    (!task_ids.has_value() || lora_a->size(0) == lora_b->size(0)),
                "lora_b must be (r, d), or (T, r, d) like lora_a");
    t.lora_a = lora_a->to(at::kFloat).contiguous();
    t.lora_b = lora_b->to(at::kFloat).contiguous();
    if (rows.has_value()) {
      TORCH_CHECK(rows->sizes() == input_ids.sizes(), "rows must have the shape of input_ids");
      t.rows = rows->to(at::kLong).contiguous();
    } else {
      TORCH_CHECK(t.seq <= t.max_len, "sequence longer than the rows of lora_a");
    }
  }
  if (visual.has_value() && visual->size(1) > 0) {
    TORCH_CHECK(visual->dim() == 3 && visual->size(0) == t.batch && visual->size(2) == t.d &&
                    visual->scalar_type() == weight.scalar_type(),
                "visual must be (B, n_v, d) of weight's dtype");
    t.visual = visual->stride(2) == 1 ? *visual : visual->contiguous();
    t.n_v = t.visual.size(1);
    t.visual_stride_b = t.visual.stride(0);
    t.visual_stride_v = t.visual.stride(1);
  }
  return t;
}

// Rows of d elements from one sample of `grad_out` (B, w, d) to the next, as the reduce
// kernels read it (dept_kernels/ops/_grads.py `row_layout`): unit column stride, rows d
// apart, a batch stride that is a multiple of d. The text columns of an output with visual
// rows (a view of w < its width rows) are so read in place.
inline int64_t grad_batch_rows(const at::Tensor& grad_out) {
  TORCH_CHECK(grad_out.dim() == 3, "grad_out must be (B, m + s, d)");
  const int64_t batch = grad_out.size(0), width = grad_out.size(1), d = grad_out.size(2);
  if (grad_out.numel() == 0) return width;  // nothing is read (an empty tensor's strides vary)
  TORCH_CHECK((d <= 1 || grad_out.stride(2) == 1) && (width <= 1 || grad_out.stride(1) == d),
              "grad_out must have unit column stride and rows d apart");
  if (batch <= 1 || d == 0) return width;
  TORCH_CHECK(grad_out.stride(0) % d == 0 && grad_out.stride(0) >= width * d,
              "grad_out must have a batch stride of whole rows, at least (m + s) * d");
  return grad_out.stride(0) / d;
}

// Data pointer of an optional tensor, nullptr when absent.
template <typename T>
inline T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace dept_kernels
