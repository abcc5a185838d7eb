// Runs the kernels of csrc/kernels.cpp on inputs written by tests/test_kernels.py and writes their outputs back, so
// that one set of cases (packed by kernels.PackedLinear, checked against PyTorch) covers every instruction set,
// including ones this machine can only emulate (NEON under qemu-aarch64). Built with the variant's flags:
//   g++ -O2 -std=c++17 -fopenmp -DMINICPMV_<ISA> -I minicpmv/model/csrc tests/csrc/check_kernels.cpp
// Usage: check_kernels IN OUT. IN is a sequence of cases, each an int64 op code and its fields (int64 scalars,
// float64 for floats, arrays as an int64 byte count and the bytes); OUT gets each case's output arrays likewise.

#include "kernels.cpp"

#include <stdio.h>
#include <stdlib.h>

#include <string>

namespace {

struct Reader {
  FILE* f;
  int64_t i64() {
    int64_t v;
    if (fread(&v, 8, 1, f) != 1) throw 0;
    return v;
  }
  double f64() {
    double v;
    if (fread(&v, 8, 1, f) != 1) throw 0;
    return v;
  }
  std::vector<char>* array() {  // owned by the case (freed at its end)
    auto* a = new std::vector<char>(i64());
    if (!a->empty() && fread(a->data(), 1, a->size(), f) != a->size()) throw 0;
    return a;
  }
};

void write_array(FILE* f, const void* p, int64_t n) {
  fwrite(&n, 8, 1, f);
  fwrite(p, 1, n, f);
}

template <class T>
T* ptr(std::vector<char>* a) { return a->empty() ? nullptr : (T*)a->data(); }

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  Reader in{fopen(argv[1], "rb")};
  FILE* out = fopen(argv[2], "wb");
  if (!in.f || !out) return 2;
  printf("%s\n", kernels_isa());
  int cases = 0;
  for (;;) {
    int64_t op;
    if (fread(&op, 8, 1, in.f) != 1) break;
    std::vector<std::vector<char>*> arrays;
    auto array = [&]() { arrays.push_back(in.array()); return arrays.back(); };
    if (op == 1) {  // mm: quant, act, nblocks, k, group, n_out, M, fp32; w, scale, bias, x
      Linear L{};
      L.quant = (int32_t)in.i64(), L.act = (int32_t)in.i64();
      L.nblocks = in.i64(), L.k = in.i64(), L.group = in.i64(), L.n_out = in.i64();
      const int64_t M = in.i64(), fp32 = in.i64();
      L.w = ptr<void>(array()), L.scale = ptr<void>(array()), L.bias = ptr<float>(array());
      const uint16_t* x = ptr<uint16_t>(array());
      std::vector<char> y(M * L.n_out * (fp32 ? 4 : 2));
      mm(&L, x, M, L.k, y.data(), L.n_out, (int)fp32);
      write_array(out, y.data(), y.size());
    } else if (op == 5) {  // mm, asymmetric int4: op 1's fields and arrays, then the offsets
      Linear L{};
      L.quant = (int32_t)in.i64(), L.act = (int32_t)in.i64();
      L.nblocks = in.i64(), L.k = in.i64(), L.group = in.i64(), L.n_out = in.i64();
      const int64_t M = in.i64(), fp32 = in.i64();
      L.w = ptr<void>(array()), L.scale = ptr<void>(array()), L.bias = ptr<float>(array());
      const uint16_t* x = ptr<uint16_t>(array());
      L.offset = ptr<uint16_t>(array());
      std::vector<char> y(M * L.n_out * (fp32 ? 4 : 2));
      mm(&L, x, M, L.k, y.data(), L.n_out, (int)fp32);
      write_array(out, y.data(), y.size());
    } else if (op == 2) {  // rmsnorm: M, D, offset, eps; x, w
      const int64_t M = in.i64(), D = in.i64();
      const float offset = (float)in.f64(), eps = (float)in.f64();
      const uint16_t *x = ptr<uint16_t>(array()), *w = ptr<uint16_t>(array());
      std::vector<uint16_t> y(M * D);
      rmsnorm_bf16(x, D, M, D, w, offset, eps, y.data(), D);
      write_array(out, y.data(), y.size() * 2);
    } else if (op == 3) {  // attention_blocks: nblk, h, d, lens[nblk]; q, k, v [L, h, d]
      const int64_t nblk = in.i64(), h = in.i64(), d = in.i64();
      std::vector<int64_t> starts(nblk), lens(nblk);
      int64_t L = 0;
      for (int64_t b = 0; b < nblk; ++b) lens[b] = in.i64(), starts[b] = L, L += lens[b];
      const uint16_t *q = ptr<uint16_t>(array()), *k = ptr<uint16_t>(array()), *v = ptr<uint16_t>(array());
      std::vector<uint16_t> y(L * h * d);
      attention_blocks(nblk, starts.data(), lens.data(), h, d, q, k, v, h * d, y.data());
      write_array(out, y.data(), y.size() * 2);
    } else if (op == 4) {  // deltanet: B, lens[B], hk, hv, dk, dv, kernel, eps; mixed, z, b, a, conv_wt, a_log,
                           // dt_bias, norm_w, then per sequence its conv and recurrent state (updated, written back)
      const int64_t B = in.i64();
      std::vector<int64_t> starts(B), lens(B);
      int64_t n = 0;
      for (int64_t b = 0; b < B; ++b) lens[b] = in.i64(), starts[b] = n, n += lens[b];
      const int64_t hk = in.i64(), hv = in.i64(), dk = in.i64(), dv = in.i64(), kernel = in.i64();
      const float eps = (float)in.f64();
      const int64_t conv_dim = 2 * hk * dk + hv * dv;
      const uint16_t *mixed = ptr<uint16_t>(array()), *z = ptr<uint16_t>(array()), *bb = ptr<uint16_t>(array());
      const uint16_t* a = ptr<uint16_t>(array());
      const float* conv_wt = ptr<float>(array());
      const uint16_t *a_log = ptr<uint16_t>(array()), *dt_bias = ptr<uint16_t>(array()), *norm_w = ptr<uint16_t>(array());
      std::vector<uint16_t*> conv(B);
      std::vector<float*> rec(B);
      for (int64_t b = 0; b < B; ++b) conv[b] = ptr<uint16_t>(array()), rec[b] = ptr<float>(array());
      std::vector<uint16_t> y(n * hv * dv);
      std::vector<float> scratch(n * (conv_dim + hv * (dv + 3)) + B * (kernel - 1) * conv_dim);
      deltanet_forward(B, starts.data(), lens.data(), hk, hv, dk, dv, kernel, mixed, conv_dim, z, hv * dv, bb, hv, a,
                       hv, conv_wt, conv.data(), rec.data(), a_log, dt_bias, norm_w, eps, y.data(), scratch.data());
      write_array(out, y.data(), y.size() * 2);
      for (int64_t b = 0; b < B; ++b) {
        write_array(out, conv[b], conv_dim * (kernel - 1) * 2);
        write_array(out, rec[b], hv * dk * dv * 4);
      }
    } else if (op == 6) {  // mm_lora: quant, act, nblocks, k, group, n_out, M, n; w, scale, bias, x, rows [M] int32,
                           // then per adapter a, b, span (kernels.pack_lora's)
      Linear L{};
      L.quant = (int32_t)in.i64(), L.act = (int32_t)in.i64();
      L.nblocks = in.i64(), L.k = in.i64(), L.group = in.i64(), L.n_out = in.i64();
      const int64_t M = in.i64(), n = in.i64();
      L.w = ptr<void>(array()), L.scale = ptr<void>(array()), L.bias = ptr<float>(array());
      const uint16_t* x = ptr<uint16_t>(array());
      const int32_t* rows = ptr<int32_t>(array());
      std::vector<LoraSite> sites(n);
      std::vector<const LoraSite*> table(n);
      for (int64_t i = 0; i < n; ++i) {
        auto* a = array();
        sites[i] = {ptr<float>(a), ptr<float>(array()), ptr<int32_t>(array()), (int64_t)(a->size() / 4 / L.k)};
        table[i] = &sites[i];
      }
      std::vector<uint16_t> y(M * L.n_out);
      mm_lora(&L, n, table.data(), rows, x, M, L.k, y.data(), L.n_out);
      write_array(out, y.data(), y.size() * 2);
    } else {
      fprintf(stderr, "unknown op %lld\n", (long long)op);
      return 2;
    }
    for (auto* a : arrays) delete a;
    ++cases;
  }
  fclose(out);
  printf("%d cases\n", cases);
  return 0;
}
