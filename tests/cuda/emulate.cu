// Host emulation of the CUDA kernels (built with -DDEPT_KERNELS_EMULATE): runs the real
// launchers, whose launch helper then executes every thread's body on the CPU. Driven by
// tests/test_cuda_emulation.py, which writes the inputs as raw files into a directory, runs
//     emulate <op> <dir> <integer and float arguments...>
// and compares <dir>/out.bin with the torch reference.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "launchers.h"

namespace {

using dept_kernels::DType;

size_t dtype_size(int code) { return code == 0 ? 4 : 2; }

// A 64-byte aligned copy of <dir>/<name>, shifted by `shift` bytes (to misalign on purpose).
char* read_file(const std::string& dir, const char* name, size_t shift = 0) {
  const std::string path = dir + "/" + name;
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    std::fprintf(stderr, "cannot open %s\n", path.c_str());
    std::exit(2);
  }
  std::fseek(f, 0, SEEK_END);
  const size_t size = static_cast<size_t>(std::ftell(f));
  std::fseek(f, 0, SEEK_SET);
  char* base = static_cast<char*>(std::aligned_alloc(64, ((size + shift) / 64 + 1) * 64));
  if (size > 0 && std::fread(base + shift, 1, size, f) != size) std::exit(2);
  std::fclose(f);
  return base + shift;
}

char* alloc(size_t bytes, size_t shift = 0) {
  char* base = static_cast<char*>(std::aligned_alloc(64, ((bytes + shift) / 64 + 1) * 64));
  std::memset(base, 0xff, bytes + shift);  // NaN-like garbage: unwritten output shows up
  return base + shift;
}

void write_file(const std::string& dir, const void* data, size_t bytes) {
  FILE* f = std::fopen((dir + "/out.bin").c_str(), "wb");
  if (bytes > 0) std::fwrite(data, 1, bytes, f);
  std::fclose(f);
}

int check(cudaError_t err) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "launcher returned %d\n", static_cast<int>(err));
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return 2;
  const std::string op = argv[1], dir = argv[2];
  std::vector<long long> n;
  for (int i = 3; i < argc; ++i) n.push_back(std::atoll(argv[i]));
  if (op == "forward") {
    // dtype batch seq m d r weight_stride has_lora has_rows shift scaling*1e6 has_tasks L
    // n_v visual_stride_b visual_stride_v (visual.bin holds the strided source)
    dept_kernels::ForwardParams a{};
    const int code = static_cast<int>(n[0]);
    a.dtype = static_cast<DType>(code);
    a.batch = n[1], a.seq = n[2], a.m = n[3], a.d = n[4], a.r = n[5], a.weight_stride = n[6];
    const size_t shift = static_cast<size_t>(n[9]) * dtype_size(code);
    a.scaling = static_cast<float>(n[10]) * 1e-6f;
    a.ids = reinterpret_cast<const int64_t*>(read_file(dir, "ids.bin"));
    a.weight = read_file(dir, "weight.bin", shift);
    a.prompt = a.m > 0 ? read_file(dir, "prompt.bin") : nullptr;
    if (n[7]) {
      a.lora_a = reinterpret_cast<const float*>(read_file(dir, "a.bin"));
      a.lora_b = reinterpret_cast<const float*>(read_file(dir, "b.bin"));
    }
    if (n[8]) a.rows = reinterpret_cast<const int64_t*>(read_file(dir, "rows.bin"));
    if (n[11]) {
      a.task_ids = reinterpret_cast<const int64_t*>(read_file(dir, "tasks.bin"));
      a.batch_order = reinterpret_cast<const int64_t*>(read_file(dir, "order.bin"));
    }
    a.lora_rows = n[12];
    a.n_v = n[13], a.visual_stride_b = n[14], a.visual_stride_v = n[15];
    a.visual = a.n_v > 0 ? read_file(dir, "visual.bin") : nullptr;
    const size_t bytes = a.batch * (a.m + a.seq + a.n_v) * a.d * dtype_size(code);
    a.out = alloc(bytes);
    if (check(dept_kernels::dept_forward(a, nullptr))) return 1;
    write_file(dir, a.out, bytes);
  } else if (op == "segment_sum") {
    // dtype tokens segments d
    dept_kernels::SegmentSumArgs a{};
    a.dtype = static_cast<DType>(n[0]);
    a.tokens = n[1], a.segments = n[2], a.d = n[3];
    a.grad = read_file(dir, "grad.bin");
    a.src_rows = reinterpret_cast<const int64_t*>(read_file(dir, "src_rows.bin"));
    a.offsets = reinterpret_cast<const int64_t*>(read_file(dir, "offsets.bin"));
    const size_t bytes = a.segments * a.d * sizeof(float);
    a.out = reinterpret_cast<float*>(alloc(bytes));
    a.carry = reinterpret_cast<float*>(
        alloc(dept_kernels::segment_sum_carry_rows(a.tokens) * a.d * sizeof(float)));
    if (check(dept_kernels::segment_sum(a, nullptr))) return 1;
    write_file(dir, a.out, bytes);
  } else if (op == "gather_add") {
    // dtype table_dtype tokens d inplace shift
    dept_kernels::GatherAddArgs a{};
    const int code = static_cast<int>(n[0]);
    a.dtype = static_cast<DType>(code);
    a.table_dtype = static_cast<DType>(n[1]);
    a.tokens = n[2], a.d = n[3];
    const size_t shift = static_cast<size_t>(n[5]) * dtype_size(code);
    char* hidden = read_file(dir, "hidden.bin", shift);
    a.hidden = hidden;
    a.rows = reinterpret_cast<const int64_t*>(read_file(dir, "rows.bin"));
    a.table = read_file(dir, "table.bin");
    const size_t bytes = a.tokens * a.d * dtype_size(code);
    a.out = n[4] ? hidden : alloc(bytes, shift);
    if (check(dept_kernels::gather_add(a, nullptr))) return 1;
    write_file(dir, a.out, bytes);
  } else {
    return 2;
  }
  return 0;
}
