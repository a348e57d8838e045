// bilinear_corners (the branch-free footprint the CPU forward runs over vector lanes) against
// bilinear_footprint (the footprint every other loop and the CUDA kernels use): the same corner
// indices and bitwise the same weights, at every kind of position, in float and double.
// Built and run by tests/test_math_host.py; prints the count of mismatches last.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "dk_math.h"

template <typename F>
int check(int64_t R, int64_t Q, const std::vector<F>& values) {
  int failures = 0;
  for (F u : values) {
    for (F v : values) {
      const auto f = dk::bilinear_footprint<F>(u, v, R, Q);
      int64_t index[4];
      F w[4];
      dk::bilinear_corners<F>(u, v, R, Q, index, w);
      for (int k = 0; k < 4; ++k) {
        const bool same_w = std::memcmp(&w[k], &f.w[k], sizeof(F)) == 0 ||
                            (std::isnan(w[k]) && std::isnan(f.w[k]));
        if (index[k] != f.index[k] || !same_w) {
          if (++failures <= 10) {
            std::printf("mismatch R=%lld Q=%lld u=%g v=%g corner %d: %lld %g vs %lld %g\n",
                        (long long)R, (long long)Q, double(u), double(v), k, (long long)index[k],
                        double(w[k]), (long long)f.index[k], double(f.w[k]));
          }
        }
      }
    }
  }
  return failures;
}

template <typename F>
int check_all() {
  const F inf = std::numeric_limits<F>::infinity(), nan = std::numeric_limits<F>::quiet_NaN();
  int failures = 0;
  for (int64_t R : {0, 1, 2, 5}) {
    for (int64_t Q : {0, 1, 3, 4}) {
      std::vector<F> values = {nan, inf, -inf, F(-1e30), F(1e30), F(-2.5), F(-1),
                               std::nextafter(F(-1), F(0)), F(-0.5), F(0), F(-0.0), F(0.25)};
      for (int64_t e : {R, Q}) {
        for (F d : {F(-1), F(-0.5), F(0), F(0.5)}) values.push_back(F(e) + d);
        values.push_back(std::nextafter(F(e), F(0)));
        values.push_back(std::nextafter(F(e) - 1, F(e)));
      }
      for (int k = 0; k < 40; ++k) values.push_back(F(-1.5) + F(k) * F(0.173));
      failures += check<F>(R, Q, values);
    }
  }
  return failures;
}

int main() {
  const int failures = check_all<float>() + check_all<double>();
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
