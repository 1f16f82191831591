// End-to-end tests of resonance-route: run the built binary, read its outputs back with tools/npy.hpp
// and compare them with a brute-force reference computed here (softmax after top-k, the capacity
// C = max(ceil(T*k/E*cf), min_capacity), drops by score or position, the expert-major slot layout,
// the switch aux loss and the z-loss). The capacity schedulers are checked against their formulas
// (LocMoE's Eq. 9 bound; the adaptive capacity at its ceiling while nothing resonates, and sized from
// the resonating candidates otherwise), and every direction is echoed in stats.json. Bad input must
// exit 2 with one line on stderr and no output.

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <sys/stat.h>
#include <sys/wait.h>
#include <vector>

#include <doctest/doctest.h>

#include <resonance/backend/native.hpp>

#include "npy.hpp"

namespace fs = std::filesystem;
namespace npy = resonance::tools::npy;

namespace {

// ---- running the tool -----------------------------------------------------------------------------

std::string quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

std::string read_text(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream os;
  os << f.rdbuf();
  return os.str();
}

struct run_result {
  int status = -1;
  std::string out;
  std::string err;
};

// A scratch directory of its own per test case (CTest may run the cases in parallel).
fs::path scratch(const std::string& name) {
  const fs::path d = fs::path(RESONANCE_TEST_TMPDIR) / "cli" / name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// `shell_prefix` runs first in the same shell, e.g. "timeout 20" (a regression cannot hang the test) or
// "ulimit -f 1;" (a file-size limit the tool inherits).
run_result run_tool(const fs::path& dir, const std::vector<std::string>& args, const std::string& shell_prefix = "") {
  std::string cmd = shell_prefix.empty() ? std::string() : shell_prefix + " ";
  cmd += quote(RESONANCE_ROUTE_EXE);
  for (const auto& a : args) cmd += " " + quote(a);
  const fs::path out = dir / "stdout.txt", err = dir / "stderr.txt";
  cmd += " >" + quote(out.string()) + " 2>" + quote(err.string());
  const int raw = std::system(cmd.c_str());
  run_result r;
  r.status = raw != -1 && WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  r.out = read_text(out);
  r.err = read_text(err);
  return r;
}

// ---- inputs ---------------------------------------------------------------------------------------

// Platform-independent pseudo-normal logits: std::mt19937's raw output is specified by the standard,
// the distributions are not. A sum of four uniforms, so values are tie-free in practice.
std::vector<double> random_logits(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<double> v(n);
  for (auto& x : v) {
    double s = 0.0;
    for (int i = 0; i < 4; ++i) s += static_cast<double>(rng() >> 8) / 16777216.0;
    x = 1.7 * (s - 2.0);
  }
  return v;
}

template <class T>
void save_matrix(const fs::path& p, const std::vector<T>& v, std::size_t rows, std::size_t cols) {
  const std::vector<std::size_t> shape{rows, cols};
  npy::save<T>(p.string(), v, shape);
}

std::vector<float> to_float(const std::vector<double>& v) { return {v.begin(), v.end()}; }

// ---- the brute-force reference --------------------------------------------------------------------

struct capacity_options {
  double factor = 1.0;
  bool by_position = false;
  bool pad = false;
  long min_capacity = 0;
  long capacity = -1;  // >= 0: this capacity (a scheduler's) instead of the factor's
};

struct reference {
  long capacity = -1;
  std::vector<double> probs;      // T*E, kept pairs only
  std::vector<std::uint8_t> map;  // T*E
  std::vector<std::int32_t> counts, demand, offsets, slots;
  double aux_loss = 0.0, z_loss = 0.0;
};

// Token choice with Megatron's default softmax: top-k of the logits (ties to the lower expert), softmax
// over the k selected. Logits are rounded to fp32 first, as the tool scores in fp32. Drop by score ranks
// an expert's candidates by their weight, or by `priority` (T*E) when given (bidirectional routing).
reference route_reference(const std::vector<double>& logits_in, std::size_t T, std::size_t E, std::size_t k,
                          std::optional<capacity_options> cap, long align,
                          const std::vector<double>* priority = nullptr) {
  std::vector<double> l(logits_in.size());
  for (std::size_t i = 0; i < l.size(); ++i) l[i] = static_cast<float>(logits_in[i]);
  reference r;
  std::vector<double> probs(T * E, 0.0);
  std::vector<std::uint8_t> chosen(T * E, 0);
  for (std::size_t t = 0; t < T; ++t) {
    std::vector<std::size_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](std::size_t a, std::size_t b) { return l[t * E + a] > l[t * E + b]; });
    double m = l[t * E + order[0]], sum = 0.0;
    for (std::size_t j = 0; j < k; ++j) sum += std::exp(l[t * E + order[j]] - m);
    for (std::size_t j = 0; j < k; ++j) {
      probs[t * E + order[j]] = std::exp(l[t * E + order[j]] - m) / sum;
      chosen[t * E + order[j]] = 1;
    }
  }
  r.map = chosen;
  if (cap) {
    r.capacity = static_cast<long>(std::ceil(static_cast<double>(T * k) / static_cast<double>(E) * cap->factor));
    r.capacity = std::max(r.capacity, cap->min_capacity);
    if (cap->capacity >= 0) r.capacity = cap->capacity;
  }
  const std::vector<double>& rank = priority != nullptr ? *priority : probs;
  r.offsets.push_back(0);
  for (std::size_t e = 0; e < E; ++e) {
    std::vector<std::size_t> tokens;
    for (std::size_t t = 0; t < T; ++t)
      if (chosen[t * E + e]) tokens.push_back(t);
    r.demand.push_back(static_cast<std::int32_t>(tokens.size()));
    if (r.capacity >= 0 && tokens.size() > static_cast<std::size_t>(r.capacity)) {
      std::vector<std::size_t> ranked = tokens;
      if (!cap->by_position)  // highest weight first, equal weights to the lower token
        std::stable_sort(ranked.begin(), ranked.end(),
                         [&](std::size_t a, std::size_t b) { return rank[a * E + e] > rank[b * E + e]; });
      for (std::size_t j = static_cast<std::size_t>(r.capacity); j < ranked.size(); ++j) r.map[ranked[j] * E + e] = 0;
      tokens.clear();
      for (std::size_t t = 0; t < T; ++t)
        if (r.map[t * E + e]) tokens.push_back(t);
    }
    r.counts.push_back(static_cast<std::int32_t>(tokens.size()));
    long n = static_cast<long>(tokens.size());
    if (cap && cap->pad) n = r.capacity;
    n = (n + align - 1) / align * align;
    for (std::size_t t : tokens) r.slots.push_back(static_cast<std::int32_t>(t));
    for (long j = static_cast<long>(tokens.size()); j < n; ++j) r.slots.push_back(-1);
    r.offsets.push_back(static_cast<std::int32_t>(r.offsets.back() + n));
  }
  r.probs.assign(T * E, 0.0);
  for (std::size_t i = 0; i < T * E; ++i)
    if (r.map[i]) r.probs[i] = probs[i];

  // Switch aux loss: softmax over all E, f_e from a plain top-k; z-loss: mean logsumexp^2.
  if (T > 0) {
    std::vector<double> p_sum(E, 0.0), f(E, 0.0);
    double z = 0.0;
    for (std::size_t t = 0; t < T; ++t) {
      const double* row = &l[t * E];
      const double m = *std::max_element(row, row + E);
      double s = 0.0;
      for (std::size_t e = 0; e < E; ++e) s += std::exp(row[e] - m);
      for (std::size_t e = 0; e < E; ++e) {
        p_sum[e] += std::exp(row[e] - m) / s;
        f[e] += chosen[t * E + e];
      }
      z += (m + std::log(s)) * (m + std::log(s));
    }
    double aux = 0.0;
    for (std::size_t e = 0; e < E; ++e)
      aux += (f[e] / static_cast<double>(T * k)) * (p_sum[e] / static_cast<double>(T));
    r.aux_loss = static_cast<double>(E) * aux;
    r.z_loss = z / static_cast<double>(T);
  }
  return r;
}

// ---- reading the outputs --------------------------------------------------------------------------

// A flat JSON object {"key": number | "string" | true | false | null, ...}, keys in order; anything
// else fails the test. Enough to check that stats.json is valid and complete.
struct json_object {
  std::vector<std::string> keys;
  std::map<std::string, std::string> values;  // raw text of each value (strings without quotes)
  double number(const std::string& key) const {
    const auto it = values.find(key);
    REQUIRE_MESSAGE(it != values.end(), "stats.json has no key " << key);
    char* end = nullptr;
    const double v = std::strtod(it->second.c_str(), &end);
    REQUIRE_MESSAGE((end != it->second.c_str() && *end == '\0'), key << " is not a number: " << it->second);
    return v;
  }
};

json_object parse_flat_json(const std::string& s) {
  json_object o;
  std::size_t i = 0;
  auto space = [&] {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\n' || s[i] == '\t' || s[i] == '\r')) ++i;
  };
  auto string = [&] {
    REQUIRE((i < s.size() && s[i] == '"'));
    const std::size_t end = s.find('"', i + 1);
    REQUIRE(end != std::string::npos);
    std::string v = s.substr(i + 1, end - i - 1);
    REQUIRE(v.find('\\') == std::string::npos);
    i = end + 1;
    return v;
  };
  space();
  REQUIRE((i < s.size() && s[i] == '{'));
  ++i;
  for (;;) {
    space();
    const std::string key = string();
    space();
    REQUIRE((i < s.size() && s[i] == ':'));
    ++i;
    space();
    std::string value;
    if (i < s.size() && s[i] == '"') {
      value = string();
    } else {
      const std::size_t end = s.find_first_of(",}\n ", i);
      REQUIRE(end != std::string::npos);
      value = s.substr(i, end - i);
      i = end;
      const bool literal = value == "true" || value == "false" || value == "null";
      char* num_end = nullptr;
      std::strtod(value.c_str(), &num_end);
      REQUIRE_MESSAGE((literal || (!value.empty() && *num_end == '\0')), "bad JSON value " << value);
    }
    REQUIRE_MESSAGE(o.values.count(key) == 0, "duplicate key " << key);
    o.keys.push_back(key);
    o.values[key] = value;
    space();
    REQUIRE(i < s.size());
    if (s[i] == '}') break;
    REQUIRE(s[i] == ',');
    ++i;
  }
  ++i;
  space();
  REQUIRE(i == s.size());
  return o;
}

template <class T>
std::vector<T> load_values(const fs::path& dir, const char* name, const std::vector<std::size_t>& shape) {
  const npy::array a = npy::load((dir / name).string());
  CHECK_MESSAGE(a.shape == shape, name << " has shape " << npy::shape_string(a.shape));
  return a.values<T>();
}

void check_close(double got, double want, const char* what) {
  CHECK_MESSAGE(std::abs(got - want) <= 1e-5 * std::abs(want) + 1e-7, what << ": " << got << " vs " << want);
}

// Every output against the reference, and stats.json against the reference and stdout.
json_object check_outputs(const fs::path& out, const run_result& r, const reference& ref, std::size_t T,
                          std::size_t E) {
  REQUIRE_MESSAGE(r.status == 0, r.err);
  CHECK(r.err.empty());
  const auto probs = load_values<float>(out, "probs.npy", {T, E});
  REQUIRE(probs.size() == ref.probs.size());
  for (std::size_t i = 0; i < probs.size(); ++i) {
    CAPTURE(i);
    check_close(probs[i], ref.probs[i], "probs");
  }
  CHECK(load_values<std::uint8_t>(out, "routing_map.npy", {T, E}) == ref.map);
  CHECK(load_values<std::int32_t>(out, "expert_counts.npy", {E}) == ref.counts);
  CHECK(load_values<std::int32_t>(out, "expert_demand.npy", {E}) == ref.demand);
  CHECK(load_values<std::int32_t>(out, "expert_offsets.npy", {E + 1}) == ref.offsets);
  CHECK(load_values<std::int32_t>(out, "slot_token.npy", {ref.slots.size()}) == ref.slots);

  const std::string text = read_text(out / "stats.json");
  CHECK(text == r.out);
  const json_object j = parse_flat_json(text);
  for (const char* key : {"capacity", "drop_rate", "padding_fraction", "load_cv", "aux_loss", "z_loss", "num_tokens",
                          "num_experts", "top_k", "num_slots", "demanded", "kept", "max_load", "mean_load"})
    CHECK_MESSAGE(j.values.count(key) == 1, "stats.json lacks " << key);
  // The default backend is auto: the fastest this build has, named with its instruction set.
  CHECK(j.values.at("backend_requested") == "auto");
#if RESONANCE_HAS_TBB
  CHECK(j.values.at("backend") == "tbb");
#else
  CHECK(j.values.at("backend") == "native");
#endif
  CHECK(j.values.at("isa") == resonance::native_isa());
  CHECK(j.number("threads") >= 1);
  CHECK(j.number("capacity") == static_cast<double>(ref.capacity));
  CHECK(j.number("num_tokens") == static_cast<double>(T));
  CHECK(j.number("num_experts") == static_cast<double>(E));
  const double demanded = std::accumulate(ref.demand.begin(), ref.demand.end(), 0.0);
  const double kept = std::accumulate(ref.counts.begin(), ref.counts.end(), 0.0);
  const double slots = static_cast<double>(ref.slots.size());
  CHECK(j.number("demanded") == demanded);
  CHECK(j.number("kept") == kept);
  CHECK(j.number("num_slots") == slots);
  check_close(j.number("drop_rate"), demanded > 0 ? (demanded - kept) / demanded : 0.0, "drop_rate");
  check_close(j.number("padding_fraction"), slots > 0 ? (slots - kept) / slots : 0.0, "padding_fraction");
  const double mean = kept / static_cast<double>(E);
  double var = 0.0, mx = 0.0;
  for (auto c : ref.counts) {
    var += (c - mean) * (c - mean);
    mx = std::max(mx, static_cast<double>(c));
  }
  check_close(j.number("mean_load"), mean, "mean_load");
  check_close(j.number("max_load"), mx, "max_load");
  check_close(j.number("load_cv"), mean > 0 ? std::sqrt(var / static_cast<double>(E)) / mean : 0.0, "load_cv");
  check_close(j.number("aux_loss"), ref.aux_loss, "aux_loss");
  check_close(j.number("z_loss"), ref.z_loss, "z_loss");
  return j;
}

bool has_temp_leftovers(const fs::path& dir) {
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (name.find(".tmp-") != std::string::npos || name.rfind(".resonance-tmp-", 0) == 0) return true;
  }
  return false;
}

// A failed run as the contract says: exit 2, nothing on stdout, one "resonance-route: " line on stderr
// holding `expect`, nothing at `out` and no temporary directory in `dir`.
void check_rejected(const run_result& r, const std::string& expect, const fs::path& out, const fs::path& dir) {
  CHECK(r.status == 2);
  CHECK(r.out.empty());
  CHECK(r.err.rfind("resonance-route: ", 0) == 0);
  CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
  CHECK((!r.err.empty() && r.err.back() == '\n'));
  CHECK_MESSAGE(r.err.find(expect) != std::string::npos, "stderr: " << r.err);
  std::error_code ec;  // (an over-long name is "not there", not an exception)
  CHECK(!fs::exists(out, ec));
  CHECK(!has_temp_leftovers(dir));
}

// S: the softmax over all E of each row of the fp32-rounded logits (expert choice's score, and the
// score by which a bidirectional expert ranks its candidates).
std::vector<double> full_softmax(const std::vector<double>& logits, std::size_t T, std::size_t E) {
  std::vector<double> s(T * E);
  for (std::size_t t = 0; t < T; ++t) {
    double m = -INFINITY, sum = 0.0;
    for (std::size_t e = 0; e < E; ++e) m = std::max(m, static_cast<double>(static_cast<float>(logits[t * E + e])));
    for (std::size_t e = 0; e < E; ++e) sum += std::exp(static_cast<double>(static_cast<float>(logits[t * E + e])) - m);
    for (std::size_t e = 0; e < E; ++e)
      s[t * E + e] = std::exp(static_cast<double>(static_cast<float>(logits[t * E + e])) - m) / sum;
  }
  return s;
}

// LocMoE Eq. 9: ec_min = 1 / (E * erfc(sqrt(delta^2 d / (2 - delta^2)))) tokens per expert per sample;
// C = ceil(ceil(T / s) * ec_min) (one sample when s = 0), clamped to [1, T].
long lower_bound_capacity(double delta, double d, std::size_t E, std::size_t T, std::size_t s) {
  const double samples = s > 0 ? std::ceil(static_cast<double>(T) / static_cast<double>(s)) : 1.0;
  const double ec = 1.0 / (static_cast<double>(E) * std::erfc(std::sqrt(delta * delta * d / (2.0 - delta * delta))));
  return static_cast<long>(std::clamp(std::ceil(samples * ec), 1.0, static_cast<double>(T)));
}

std::int32_t max_of(const std::vector<std::int32_t>& v) { return *std::max_element(v.begin(), v.end()); }

}  // namespace

TEST_CASE("cli: default options route top-1 softmax, dropless") {
  const fs::path d = scratch("default");
  const std::size_t T = 40, E = 6;
  const auto logits = random_logits(T * E, 1);
  save_matrix(d / "logits.npy", to_float(logits), T, E);
  const run_result r = run_tool(d, {"--logits", (d / "logits.npy").string(), "--out", (d / "out").string()});
  const json_object j = check_outputs(d / "out", r, route_reference(logits, T, E, 1, std::nullopt, 1), T, E);
  CHECK(j.number("capacity") == -1);
  CHECK(j.number("drop_rate") == 0);
  CHECK(j.number("top_k") == 1);
  CHECK(j.keys.front() == "num_tokens");
  CHECK(!has_temp_leftovers(d));
}

TEST_CASE("cli: top-2, capacity factor, drop by score, float64 logits") {
  const fs::path d = scratch("score");
  const std::size_t T = 50, E = 8;
  const auto logits = random_logits(T * E, 2);
  save_matrix(d / "logits.npy", logits, T, E);
  const run_result r = run_tool(d, {"--logits", (d / "logits.npy").string(), "--out", (d / "out").string(), "--top-k",
                                    "2", "--capacity-factor", "1.0", "--drop", "score"});
  const reference ref = route_reference(logits, T, E, 2, capacity_options{.factor = 1.0}, 1);
  REQUIRE(ref.capacity == 13);  // ceil(50 * 2 / 8 * 1.0)
  const json_object j = check_outputs(d / "out", r, ref, T, E);
  CHECK(j.number("drop_rate") > 0);  // the data does overflow some experts
}

TEST_CASE("cli: every backend of the build writes the same files") {
  const std::size_t T = 3000, E = 64, k = 4;  // more than one plan block, vector bodies and tails
  const auto logits = random_logits(T * E, 29);
  const fs::path dir = scratch("backends");
  save_matrix(dir / "l.npy", to_float(logits), T, E);
  std::vector<std::string> backends{"serial", "native", "auto"};
#if RESONANCE_HAS_SIMD
  backends.push_back("simd");
#endif
#if RESONANCE_HAS_TBB
  backends.push_back("tbb");
#endif
#if RESONANCE_ROUTE_HAS_KOKKOS
  backends.push_back("kokkos");
#endif
  const char* files[] = {"probs.npy",         "routing_map.npy",    "expert_counts.npy",
                         "expert_demand.npy", "expert_offsets.npy", "slot_token.npy"};
  for (const char* direction : {"token", "bidirectional", "expert", "sinkhorn"}) {
    CAPTURE(direction);
    std::map<std::string, std::string> first;
    for (const auto& b : backends) {
      CAPTURE(b);
      const fs::path out = dir / (std::string(direction) + "_" + b);
      const auto r =
          run_tool(dir, {"--logits", (dir / "l.npy").string(), "--top-k", std::to_string(k), "--capacity-factor", "1.1",
                         "--direction", direction, "--backend", b, "--out", out.string()});
      REQUIRE_MESSAGE(r.status == 0, r.err);
      CHECK(parse_flat_json(r.out).values.at("backend_requested") == b);
      for (const char* f : files) {
        CAPTURE(f);
        const std::string bytes = read_text(out / f);
        if (b == backends.front()) {
          first[f] = bytes;
        } else {
          CHECK(bytes == first[f]);
        }
      }
    }
  }
}

TEST_CASE("cli: drop by position, pad to capacity, alignment and min capacity") {
  const fs::path d = scratch("position");
  const std::size_t T = 64, E = 8;
  const auto logits = random_logits(T * E, 3);
  save_matrix(d / "logits.npy", to_float(logits), T, E);
  const std::string in = (d / "logits.npy").string();
  SUBCASE("position, padded, aligned") {
    const run_result r = run_tool(d, {"--logits", in, "--out", (d / "a").string(), "--top-k", "3", "--capacity-factor",
                                      "0.75", "--drop", "position", "--pad-to-capacity", "--align", "4"});
    const reference ref =
        route_reference(logits, T, E, 3, capacity_options{.factor = 0.75, .by_position = true, .pad = true}, 4);
    REQUIRE(ref.capacity == 18);  // ceil(64 * 3 / 8 * 0.75)
    const json_object j = check_outputs(d / "a", r, ref, T, E);
    CHECK(j.number("num_slots") == 8 * 20);  // 18 rounded up to 20 slots per expert
    CHECK(j.number("padding_fraction") > 0);
  }
  SUBCASE("min capacity above the computed one, ties among top-1 weights go to the earliest tokens") {
    // Top-1 softmax-after-top-k weights are all exactly 1: drop by score keeps the earliest tokens.
    const run_result r = run_tool(d, {"--logits", in, "--out", (d / "b").string(), "--capacity-factor", "1",
                                      "--min-capacity", "9", "--drop", "score"});
    const reference ref =
        route_reference(logits, T, E, 1, capacity_options{.factor = 1.0, .by_position = true, .min_capacity = 9}, 1);
    REQUIRE(ref.capacity == 9);
    check_outputs(d / "b", r, ref, T, E);
  }
}

TEST_CASE("cli: drop random is seeded and reproducible") {
  const fs::path d = scratch("random");
  const std::size_t T = 60, E = 6;
  const auto logits = random_logits(T * E, 4);
  save_matrix(d / "logits.npy", to_float(logits), T, E);
  const std::string in = (d / "logits.npy").string();
  auto route = [&](const char* name, const char* seed) {
    const run_result r = run_tool(d, {"--logits", in, "--out", (d / name).string(), "--top-k", "2", "--capacity-factor",
                                      "0.5", "--drop", "random", "--seed", seed});
    REQUIRE_MESSAGE(r.status == 0, r.err);
    return load_values<std::int32_t>(d / name, "slot_token.npy", {E * 10});  // C = ceil(60*2/6*0.5) = 10
  };
  const auto a = route("a", "7"), b = route("b", "7"), c = route("c", "8");
  CHECK(a == b);
  CHECK(a != c);
  // Whatever is kept is a subset of each token's top-2, and every full expert keeps exactly C.
  const reference ref = route_reference(logits, T, E, 2, std::nullopt, 1);
  const auto counts = load_values<std::int32_t>(d / "a", "expert_counts.npy", {E});
  const auto map = load_values<std::uint8_t>(d / "a", "routing_map.npy", {T, E});
  for (std::size_t e = 0; e < E; ++e) {
    CHECK(counts[e] == std::min(ref.demand[e], 10));
    for (std::size_t t = 0; t < T; ++t) CHECK(map[t * E + e] <= ref.map[t * E + e]);
  }
}

TEST_CASE("cli: an existing output directory receives the files") {
  const fs::path d = scratch("existing");
  const std::size_t T = 12, E = 4;
  const auto logits = random_logits(T * E, 5);
  save_matrix(d / "logits.npy", to_float(logits), T, E);
  const fs::path out = d / "out";
  fs::create_directories(out);
  std::ofstream(out / "keep.txt") << "mine";
  std::ofstream(out / "probs.npy") << "stale";
  const run_result r = run_tool(
      d, {"--logits", (d / "logits.npy").string(), "--out", out.string() + "/", "--top-k", "2", "--align", "2"});
  check_outputs(out, r, route_reference(logits, T, E, 2, std::nullopt, 2), T, E);
  CHECK(read_text(out / "keep.txt") == "mine");
  CHECK(!has_temp_leftovers(d));
}

TEST_CASE("cli: zero tokens") {
  const fs::path d = scratch("empty");
  save_matrix(d / "logits.npy", std::vector<double>{}, 0, 5);
  const run_result r = run_tool(d, {"--logits", (d / "logits.npy").string(), "--out", (d / "out").string(),
                                    "--capacity-factor", "2", "--pad-to-capacity"});
  const json_object j =
      check_outputs(d / "out", r, route_reference({}, 0, 5, 1, capacity_options{.factor = 2, .pad = true}, 1), 0, 5);
  CHECK(j.number("capacity") == 0);
  CHECK(j.number("aux_loss") == 0);
}

TEST_CASE("cli: --capacity lower-bound is LocMoE's Eq. 9 bound, and the plan drops by score with it") {
  const fs::path d = scratch("lower_bound");
  const std::size_t T = 100, E = 8, k = 2;
  const auto logits = random_logits(T * E, 7);
  save_matrix(d / "logits.npy", to_float(logits), T, E);
  const std::string in = (d / "logits.npy").string();
  struct variant {
    const char* name;
    const char* delta;
    const char* hidden;
    const char* per_sample;  // nullptr: the batch is one sample
    long expected;
  };
  // 9 = ceil(ceil(100/16) * 1.1788); 22 = ceil(21.31); a huge bound is clamped to T (dropless).
  for (const variant& v : {variant{"a", "0.2", "64", "16", 9}, variant{"b", "0.24", "128", nullptr, 22},
                           variant{"c", "0.6", "64", "16", 100}}) {
    const std::string name = v.name;
    CAPTURE(name);
    const long C = lower_bound_capacity(std::stod(v.delta), std::stod(v.hidden), E, T,
                                        v.per_sample ? std::stoul(v.per_sample) : 0);
    REQUIRE(C == v.expected);
    std::vector<std::string> args{"--logits", in,      "--out",         (d / v.name).string(),
                                  "--top-k",  "2",     "--capacity",    "lower-bound",
                                  "--delta",  v.delta, "--hidden-size", v.hidden};
    if (v.per_sample) args.insert(args.end(), {"--tokens-per-sample", v.per_sample});
    const run_result r = run_tool(d, args);
    const reference ref = route_reference(logits, T, E, k, capacity_options{.capacity = C}, 1);
    const json_object j = check_outputs(d / v.name, r, ref, T, E);
    CHECK(j.values.at("direction") == "token");
    if (C < static_cast<long>(T)) {
      REQUIRE(C < max_of(ref.demand));  // the bound binds: some expert drops, by score
      CHECK(j.number("dropped") > 0);
    } else {
      CHECK(j.number("drop_rate") == 0);
    }
  }
}

TEST_CASE("cli: --capacity adaptive stays at its ceiling while nothing resonates (the TCR regime)") {
  const fs::path d = scratch("adaptive_tcr");
  const std::size_t T = 64, E = 8, k = 2;
  auto logits = random_logits(T * E, 8);
  for (double& x : logits) x *= 0.05;
  // Isotropic-looking affinities: every logit is below 3/sqrt(d) = 0.375 for d = 64, so no candidate
  // resonates, the estimate is unbounded and C = ceil(ceiling * T*k/E) (first step: no rate limit).
  for (double x : logits) REQUIRE(x < 3.0 / std::sqrt(64.0));
  save_matrix(d / "logits.npy", to_float(logits), T, E);
  const std::string in = (d / "logits.npy").string();
  const double per_expert = static_cast<double>(T * k) / static_cast<double>(E);  // 16
  for (const char* ceiling : {"", "1.25"}) {
    const std::string ceiling_text = ceiling;
    CAPTURE(ceiling_text);
    const fs::path out = d / (*ceiling ? "ceiling" : "default");
    std::vector<std::string> args{"--logits", in,           "--out",    out.string(),    "--top-k",
                                  "2",        "--capacity", "adaptive", "--hidden-size", "64"};
    if (*ceiling) args.insert(args.end(), {"--capacity-ceiling", ceiling});
    const long C = static_cast<long>(std::ceil((*ceiling ? std::stod(ceiling) : 2.0) * per_expert));
    REQUIRE(C == (*ceiling ? 20 : 32));
    const reference ref = route_reference(logits, T, E, k, capacity_options{.capacity = C}, 1);
    const json_object j = check_outputs(out, run_tool(d, args), ref, T, E);
    if (!*ceiling) {
      REQUIRE(max_of(ref.demand) <= C);  // the ceiling is above every demand: token choice, nothing dropped
      CHECK(j.number("drop_rate") == 0);
    } else {
      REQUIRE(max_of(ref.demand) > C);
      CHECK(j.number("dropped") > 0);
    }
  }
}

TEST_CASE("cli: --capacity adaptive sizes C from the resonating candidates (the ECR regime)") {
  const fs::path d = scratch("adaptive_ecr");
  const std::size_t T = 64, E = 4, hidden = 64;
  const double delta = 3.0 / std::sqrt(static_cast<double>(hidden));  // 0.375: "resonating"
  // Token t proposes expert t % E; the first n[e] tokens of each expert have an affinity above delta,
  // the others below it; every other logit is small. Each expert has 16 candidates.
  const std::size_t n[E] = {5, 6, 4, 7};
  std::vector<double> logits(T * E);
  for (std::size_t t = 0; t < T; ++t)
    for (std::size_t e = 0; e < E; ++e)
      logits[t * E + e] = e != t % E ? -0.1 + 0.01 * static_cast<double>(e)
                                     : (t / E < n[e] ? 0.5 : 0.2) + 0.001 * static_cast<double>(t);
  save_matrix(d / "logits.npy", logits, T, E);
  const std::string in = (d / "logits.npy").string();

  // Brute force from the TCR proposals: demand_e, n_e (affinity >= delta) and the isotropic null.
  std::vector<double> demand(E, 0.0), resonating(E, 0.0);
  for (std::size_t t = 0; t < T; ++t) {
    const auto* row = &logits[t * E];
    const auto top = static_cast<std::size_t>(std::max_element(row, row + E) - row);
    demand[top] += 1.0;
    if (static_cast<double>(static_cast<float>(row[top])) >= delta) resonating[top] += 1.0;
  }
  const double phi3 = 1.0 - 0.5 * std::erfc(3.0 / std::sqrt(2.0));  // Phi(z), z = 3
  const double p0 = 1.0 - std::pow(phi3, static_cast<double>(E));
  double need = 0.0;
  for (std::size_t e = 0; e < E; ++e) {
    CAPTURE(e);
    REQUIRE(demand[e] == 16.0);
    REQUIRE(resonating[e] == static_cast<double>(n[e]));
    REQUIRE(resonating[e] > 2.0 * demand[e] * p0 + 3.0);  // beyond chance: the ECR regime
    need = std::max(need, std::min(demand[e], 2.0 * resonating[e]));
  }
  REQUIRE(need == 14.0);  // margin 2 times the 7 resonating candidates of expert 3
  const double per_expert = static_cast<double>(T) / static_cast<double>(E);  // T*k/E, k = 1
  const std::vector<double> S = full_softmax(logits, T, E);
  for (const char* floor : {"", "0.9"}) {
    const std::string floor_text = floor;
    CAPTURE(floor_text);
    const double f = *floor ? std::stod(floor) : 0.5;
    const long C = static_cast<long>(std::max(std::ceil(f * per_expert), std::min(std::ceil(2.0 * per_expert), need)));
    REQUIRE(C == (*floor ? 15 : 14));  // the floor 0.9 * 16 = 14.4 binds
    const fs::path out = d / (*floor ? "floor" : "default");
    std::vector<std::string> args{"--logits",      in,           "--out",    out.string(),    "--direction",
                                  "bidirectional", "--capacity", "adaptive", "--hidden-size", "64"};
    if (*floor) args.insert(args.end(), {"--capacity-floor", floor});
    const reference ref = route_reference(logits, T, E, 1, capacity_options{.capacity = C}, 1, &S);
    const json_object j = check_outputs(out, run_tool(d, args), ref, T, E);
    CHECK(j.values.at("direction") == "bidirectional");
    CHECK(j.number("dropped") == static_cast<double>(E * (16 - C)));
    // Each expert keeps its resonating candidates (the highest scores) and drops its earliest others.
    const auto map = load_values<std::uint8_t>(out, "routing_map.npy", {T, E});
    for (std::size_t t = 0; t < T; ++t) {
      CAPTURE(t);
      const std::size_t e = t % E, j2 = t / E;
      CHECK(map[t * E + e] == (j2 < n[e] || j2 >= static_cast<std::size_t>(16 - C + static_cast<long>(n[e])) ? 1 : 0));
    }
  }
}

TEST_CASE("cli: stats.json echoes the direction, and expert choice demands every token of every expert") {
  const fs::path d = scratch("directions");
  const std::size_t T = 30, E = 6, k = 2;
  const auto logits = random_logits(T * E, 9);
  save_matrix(d / "logits.npy", to_float(logits), T, E);
  const std::string in = (d / "logits.npy").string();
  const std::vector<double> S = full_softmax(logits, T, E);

  SUBCASE("expert") {
    const fs::path out = d / "expert";
    const run_result r = run_tool(
        d, {"--logits", in, "--out", out.string(), "--direction", "expert", "--top-k", "2", "--capacity-factor", "1"});
    REQUIRE_MESSAGE(r.status == 0, r.err);
    const json_object j = parse_flat_json(read_text(out / "stats.json"));
    const long C = 10;  // ceil(30 * 2 / 6 * 1)
    CHECK(j.values.at("direction") == "expert");
    CHECK(j.number("capacity") == C);
    CHECK(j.number("demanded") == static_cast<double>(T * E));
    check_close(j.number("drop_rate"), static_cast<double>(T * E - E * C) / static_cast<double>(T * E), "drop_rate");
    CHECK(load_values<std::int32_t>(out, "expert_demand.npy", {E}) == std::vector<std::int32_t>(E, T));
    CHECK(load_values<std::int32_t>(out, "expert_counts.npy", {E}) == std::vector<std::int32_t>(E, C));
    // Expert e keeps its top-C tokens by S[:, e], weight S[t, e].
    const auto map = load_values<std::uint8_t>(out, "routing_map.npy", {T, E});
    const auto probs = load_values<float>(out, "probs.npy", {T, E});
    for (std::size_t e = 0; e < E; ++e) {
      std::vector<std::size_t> order(T);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](std::size_t a, std::size_t b) { return S[a * E + e] > S[b * E + e]; });
      for (std::size_t j2 = 0; j2 < T; ++j2) {
        const std::size_t t = order[j2];
        CAPTURE(t);
        CAPTURE(e);
        CHECK(map[t * E + e] == (j2 < static_cast<std::size_t>(C) ? 1 : 0));
        check_close(probs[t * E + e], j2 < static_cast<std::size_t>(C) ? S[t * E + e] : 0.0, "probs");
      }
    }
  }
  SUBCASE("bidirectional, dropless: the token route") {
    const fs::path out = d / "bidirectional";
    const run_result r =
        run_tool(d, {"--logits", in, "--out", out.string(), "--direction", "bidirectional", "--top-k", "2"});
    const json_object j = check_outputs(out, r, route_reference(logits, T, E, k, std::nullopt, 1), T, E);
    CHECK(j.values.at("direction") == "bidirectional");
  }
  SUBCASE("sinkhorn") {
    const fs::path out = d / "sinkhorn";
    const run_result r =
        run_tool(d, {"--logits", in, "--out", out.string(), "--direction", "sinkhorn", "--top-k", "2"});
    REQUIRE_MESSAGE(r.status == 0, r.err);
    const json_object j = parse_flat_json(read_text(out / "stats.json"));
    CHECK(j.values.at("direction") == "sinkhorn");
    CHECK(j.number("demanded") == static_cast<double>(T * k));
    // k = 2: each token keeps two experts, weighted by the softmax over all E, not renormalised.
    const auto map = load_values<std::uint8_t>(out, "routing_map.npy", {T, E});
    const auto probs = load_values<float>(out, "probs.npy", {T, E});
    for (std::size_t t = 0; t < T; ++t) {
      CAPTURE(t);
      CHECK(std::accumulate(map.begin() + static_cast<std::ptrdiff_t>(t * E),
                            map.begin() + static_cast<std::ptrdiff_t>((t + 1) * E), 0) == 2);
      for (std::size_t e = 0; e < E; ++e) check_close(probs[t * E + e], map[t * E + e] ? S[t * E + e] : 0.0, "probs");
    }
  }
}

TEST_CASE("cli: --ranks reports the All-to-All traffic the routing map implies") {
  const fs::path d = scratch("traffic");
  const std::size_t T = 41, E = 8, k = 3, R = 4, rpn = 2, row_bytes = 100;
  const auto logits = random_logits(T * E, 21);
  save_matrix(d / "logits.npy", to_float(logits), T, E);
  const std::string in = (d / "logits.npy").string();
  for (const std::string placement : {"contiguous", "round-robin"}) {
    CAPTURE(placement);
    const fs::path out = d / placement;
    const run_result r = run_tool(d, {"--logits", in, "--out", out.string(), "--top-k", "3", "--ranks", "4",
                                      "--ranks-per-node", "2", "--placement", placement, "--row-bytes", "100"});
    // Dropless token choice: the whole file's map is the union of the shards' maps.
    const json_object j = check_outputs(out, r, route_reference(logits, T, E, k, std::nullopt, 1), T, E);
    const auto map = load_values<std::uint8_t>(out, "routing_map.npy", {T, E});
    const auto rank_of = [&](std::size_t e) { return placement == "contiguous" ? e / (E / R) : e % R; };
    double self = 0, intra = 0, inter = 0, expert_inter = 0, node_inter = 0;
    std::vector<double> load(R, 0.0);
    for (std::size_t t = 0; t < T; ++t) {
      const std::size_t src_shard = [&] {  // shard s holds tokens [s*T/R, (s+1)*T/R)
        std::size_t s = 0;
        while ((s + 1) * T / R <= t) ++s;
        return s;
      }();
      std::vector<int> ranks(R, 0), nodes(R / rpn, 0);
      for (std::size_t e = 0; e < E; ++e)
        if (map[t * E + e]) {
          ranks[rank_of(e)] = 1;
          nodes[rank_of(e) / rpn] = 1;
          load[rank_of(e)] += 1;
          expert_inter += rank_of(e) / rpn != src_shard / rpn;
        }
      for (std::size_t q = 0; q < R; ++q)
        if (ranks[q]) (q == src_shard ? self : q / rpn == src_shard / rpn ? intra : inter) += 1;
      for (std::size_t n = 0; n < R / rpn; ++n) node_inter += nodes[n] && n != src_shard / rpn;
    }
    CHECK(j.number("traffic_ranks") == R);
    CHECK(j.number("traffic_nodes") == R / rpn);
    CHECK(j.values.at("traffic_placement") == placement);
    CHECK(j.number("traffic_token_rows_self") == self);
    CHECK(j.number("traffic_token_rows_intra_node") == intra);
    CHECK(j.number("traffic_token_rows_inter_node") == inter);
    CHECK(j.number("traffic_dispatch_bytes_inter_node") == inter * row_bytes);
    CHECK(j.number("traffic_expert_rows_inter_node") == expert_inter);
    CHECK(j.number("traffic_combine_bytes_inter_node") == expert_inter * row_bytes);
    CHECK(j.number("traffic_two_level_bytes_inter_node") == node_inter * row_bytes);
    CHECK(j.values.at("traffic_padding_bytes") == "null");
    const double mean = std::accumulate(load.begin(), load.end(), 0.0) / R;
    check_close(j.number("traffic_rank_max_over_mean"), *std::max_element(load.begin(), load.end()) / mean,
                "max_over_mean");
  }
  SUBCASE("padded: each shard pads every expert to its own capacity") {
    const fs::path out = d / "padded";
    const run_result r = run_tool(d, {"--logits", in, "--out", out.string(), "--top-k", "2", "--capacity-factor", "1.5",
                                      "--pad-to-capacity", "--ranks", "4", "--row-bytes", "10"});
    REQUIRE_MESSAGE(r.status == 0, r.err);
    const json_object j = parse_flat_json(read_text(out / "stats.json"));
    double padded = 0;
    for (std::size_t s = 0; s < R; ++s) {
      const std::size_t Ts = (s + 1) * T / R - s * T / R;
      padded += static_cast<double>(E) * std::ceil(static_cast<double>(Ts * 2) / static_cast<double>(E) * 1.5);
    }
    CHECK(j.number("traffic_padded_bytes") == padded * 10);
    // Padding = slots - kept; at most T*k kept.
    CHECK(j.number("traffic_padding_bytes") >= (padded - static_cast<double>(T * 2)) * 10);
    CHECK(j.number("traffic_padding_bytes") <= padded * 10);
  }
  SUBCASE("--node-limit: every token's experts on at most M nodes") {
    for (const std::string m : {"1", "2"}) {
      const fs::path out = d / ("limited" + m);
      const run_result r =
          run_tool(d, {"--logits", in, "--out", out.string(), "--top-k", "2", "--score", "sigmoid", "--ranks", "4",
                       "--ranks-per-node", "1", "--placement", "round-robin", "--node-limit", m});
      REQUIRE_MESSAGE(r.status == 0, r.err);
      const auto map = load_values<std::uint8_t>(out, "routing_map.npy", {T, E});
      for (std::size_t t = 0; t < T; ++t) {
        std::vector<int> nodes(R, 0);
        int chosen = 0;
        for (std::size_t e = 0; e < E; ++e)
          if (map[t * E + e]) {
            nodes[e % R] = 1;
            ++chosen;
          }
        CHECK(chosen == 2);
        CHECK(std::accumulate(nodes.begin(), nodes.end(), 0) <= std::stoi(m));
      }
    }
  }
}

TEST_CASE("cli: --help and --version") {
  const fs::path d = scratch("help");
  const run_result h = run_tool(d, {"--top-k", "2", "--help"});
  CHECK(h.status == 0);
  CHECK(h.out.find("usage: resonance-route") != std::string::npos);
  CHECK(h.out.find("--capacity-factor") != std::string::npos);
  const run_result v = run_tool(d, {"--version"});
  CHECK(v.status == 0);
  CHECK(v.out.rfind("resonance-route ", 0) == 0);
}

TEST_CASE("cli: bad input exits 2 with one line on stderr and no output directory") {
  const fs::path d = scratch("bad");
  const std::size_t T = 10, E = 4;
  auto logits = to_float(random_logits(T * E, 6));
  const std::string good = (d / "logits.npy").string();
  save_matrix(d / "logits.npy", logits, T, E);
  logits[7] = std::nanf("");
  save_matrix(d / "nan.npy", logits, T, E);
  const std::vector<std::size_t> one_d{E};
  npy::save<float>((d / "vector.npy").string(), std::vector<float>(E, 0.0f), one_d);
  const std::vector<std::size_t> short_shape{E - 1};
  npy::save<double>((d / "bias3.npy").string(), std::vector<double>(E - 1, 0.0), short_shape);
  std::vector<float> wide = logits;
  wide[7] = 0.5f;
  for (float& x : wide) x *= 8.0f;  // top-1 affinities far above 1: not cosines
  save_matrix(d / "wide.npy", wide, T, E);
  const std::string wide_in = (d / "wide.npy").string();
  std::ofstream(d / "garbage.npy") << "not an array";
  std::ofstream(d / "a_file") << "x";
  const std::string out = (d / "out").string();

  struct bad_case {
    std::vector<std::string> args;
    std::string expect;  // a piece of the stderr line
  };
  const std::vector<bad_case> cases = {
      {{"--out", out}, "--logits is required"},
      {{"--logits", good}, "--out is required"},
      {{"--logits", (d / "missing.npy").string(), "--out", out}, "cannot open"},
      {{"--logits", (d / "garbage.npy").string(), "--out", out}, "bad magic"},
      {{"--logits", (d / "nan.npy").string(), "--out", out}, "finite"},
      {{"--logits", (d / "vector.npy").string(), "--out", out}, "2-D"},
      {{"--logits", good, "--out", out, "--top-k", "0"}, "--top-k"},
      {{"--logits", good, "--out", out, "--top-k", "5"}, "--top-k"},
      {{"--logits", good, "--out", out, "--top-k", "2x"}, "--top-k: expected an integer, got '2x'"},
      {{"--logits", good, "--out", out, "--top-k", ""}, "--top-k: expected an integer"},
      {{"--logits", good, "--out", out, "--top-k", "99999999999999999999"}, "out of range"},
      {{"--logits", good, "--out", out, "--capacity-factor", "-1"}, "--capacity-factor"},
      {{"--logits", good, "--out", out, "--capacity-factor", "nan"}, "--capacity-factor"},
      {{"--logits", good, "--out", out, "--top-k", "2", "--num-groups", "3", "--group-topk", "1"}, "--num-groups"},
      {{"--logits", good, "--out", out, "--frobnicate"}, "unknown option '--frobnicate'"},
      {{"--logits", good, "--out", out, "--direction", "expert"}, "--direction expert: needs a capacity"},
      {{"--logits", good, "--out", out, "--direction", "sinkhorn", "--pre-softmax"},
       "--pre-softmax: not used by --direction sinkhorn"},
      {{"--logits", good, "--out", out, "--direction", "sinkhorn", "--sinkhorn-iterations", "0"},
       "--sinkhorn-iterations"},
      {{"--logits", good, "--out", out, "--sinkhorn-tolerance", "1e-3"}, "needs --direction sinkhorn"},
      {{"--logits", good, "--out", out, "--causal"}, "--causal: needs --direction expert or bidirectional"},
      {{"--logits", good, "--out", out, "--direction", "bidirectional", "--causal", "--capacity-factor", "1", "--drop",
        "random"},
       "--drop: not used by --direction bidirectional"},
      {{"--logits", good, "--out", out, "--direction", "expert", "--capacity-factor", "1", "--seed", "3"},
       "--seed: not used by --direction expert"},
      {{"--logits", good, "--out", out, "--capacity", "adaptive", "--capacity-factor", "1"}, "not both"},
      {{"--logits", good, "--out", out, "--capacity", "sometimes"}, "--capacity: expected lower-bound or adaptive"},
      {{"--logits", good, "--out", out, "--delta", "0.1"}, "--delta: needs --capacity lower-bound"},
      {{"--logits", good, "--out", out, "--hidden-size", "64"}, "--hidden-size: needs --capacity"},
      {{"--logits", good, "--out", out, "--capacity", "adaptive", "--capacity-floor", "3"}, "--capacity-ceiling"},
      {{"--logits", good, "--out", out, "--direction", "sideways"}, "--direction"},
      {{"--logits", good, "--out", out, "--score", "tanh"}, "--score"},
      {{"--logits", good, "--out", out, "--capacity-factor", "1", "--drop", "oldest"}, "--drop"},
      {{"--logits", good, "--out", out, "--drop", "position"}, "needs --capacity-factor"},
      {{"--logits", good, "--out", out, "--backend", "cuda"}, "--backend cuda: not available in this build"},
      {{"--logits", good, "--out", out, "--backend", "gpu"},
       "--backend: expected auto, serial, native, simd, tbb, kokkos or cuda, got 'gpu'"},
      {{"--logits", good, "--out", out, "--score", "sigmoid", "--expert-bias", (d / "bias3.npy").string()},
       "--expert-bias"},
      {{"--logits", good, "--out", out, "--direction", "sinkhorn", "--score", "sigmoid"},
       "--score: not used by --direction sinkhorn"},
      {{"--logits", good, "--out", out, "--direction", "expert", "--capacity-factor", "1", "--scaling-factor", "2"},
       "--scaling-factor: not used by --direction expert"},
      {{"--logits", good, "--out", out, "--capacity", "adaptive", "--min-capacity", "2"},
       "--min-capacity: needs --capacity-factor"},
      {{"--logits", good, "--out", out, "--capacity", "lower-bound", "--estimate", "etr_bound"},
       "--estimate: needs --capacity adaptive"},
      {{"--logits", good, "--out", out, "--capacity", "lower-bound", "--delta", "1.5"}, "--delta: expected"},
      {{"--logits", good, "--out", out, "--capacity", "lower-bound", "--hidden-size", "0"}, "--hidden-size: expected"},
      {{"--logits", good, "--out", out, "--capacity", "lower-bound", "--tokens-per-sample", "-3"},
       "--tokens-per-sample: expected"},
      {{"--logits", wide_in, "--out", out, "--capacity", "lower-bound"}, "--capacity lower-bound (estimated delta)"},
      {{"--logits", good, "--out", out, "--capacity", "adaptive", "--capacity-floor", "0"},
       "--capacity-floor: expected"},
      {{"--logits", good, "--out", out, "--top-k", "1", "--top-k", "2"}, "--top-k: given more than once"},
      {{"--logits", good, "--out", out, "--direction", "expert", "--capacity-factor", "1", "--causal=yes"},
       "--causal: takes no value"},
      {{"--logits", good, "--out", out, "--direction", "sinkhorn", "--sinkhorn-tolerance", "0"},
       "--sinkhorn-tolerance: expected"},
      {{"--logits", good, "--out", out, "--capacity-factor", "1", "--seed", "-1"},
       "--seed: expected a non-negative integer"},
      {{"--logits", good, "--out", out, "--align", "0"}, "--align: expected"},
      {{"--logits", good, "--out", out, "--ranks", "0"}, "--ranks: expected a value in [1, 512]"},
      {{"--logits", good, "--out", out, "--ranks", "3"}, "--ranks: the contiguous placement needs"},
      {{"--logits", good, "--out", out, "--ranks-per-node", "2"}, "--ranks-per-node: needs --ranks"},
      {{"--logits", good, "--out", out, "--ranks", "4", "--ranks-per-node", "3"},
       "--ranks-per-node: expected a divisor of --ranks"},
      {{"--logits", good, "--out", out, "--ranks", "4", "--ranks-per-node", "0"}, "--ranks-per-node: expected"},
      {{"--logits", good, "--out", out, "--ranks", "2", "--placement", "random"}, "--placement: expected"},
      {{"--logits", good, "--out", out, "--ranks", "2", "--row-bytes", "0"}, "--row-bytes: expected"},
      {{"--logits", good, "--out", out, "--node-limit", "1"}, "--node-limit: needs --ranks"},
      {{"--logits", good, "--out", out, "--ranks", "2", "--node-limit", "3"},
       "--node-limit: expected at most the number of nodes"},
      {{"--logits", good, "--out", out, "--ranks", "2", "--top-k", "1", "--node-limit", "2"},
       "--node-limit: expected at most --top-k"},
      {{"--logits", good, "--out", out, "--ranks", "4", "--top-k", "3", "--node-limit", "1"}, "--top-k"},
      {{"--logits", good, "--out", out, "--ranks", "2", "--node-limit", "1", "--num-groups", "2", "--group-topk", "1"},
       "--node-limit: give either"},
      {{"--logits", good, "--out", out, "--group-score", "mean"}, "--group-score: expected"},
      {{"--logits", good, "--out", out, "--direction", "expert", "--capacity-factor", "1", "--ranks", "2",
        "--node-limit", "1"},
       "--node-limit: not used by --direction expert"},
      {{"--logits", good, "--out", (d / "a_file").string()}, "not a directory"},
      {{"--logits", good, "--out", (d / "no" / "such").string()}, "--out"},
  };
  for (const auto& c : cases) {
    std::string cmd;
    for (const auto& a : c.args) cmd += a + " ";
    CAPTURE(cmd);
    const run_result r = run_tool(d, c.args);
    CHECK(r.status == 2);
    CHECK(r.out.empty());
    CHECK(r.err.rfind("resonance-route: ", 0) == 0);
    CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
    CHECK((!r.err.empty() && r.err.back() == '\n'));
    CHECK_MESSAGE(r.err.find(c.expect) != std::string::npos, "stderr: " << r.err);
    CHECK(!fs::exists(out));
    CHECK(!has_temp_leftovers(d));
  }
  CHECK(read_text(d / "a_file") == "x");
}

TEST_CASE("cli: inputs that are not regular files, or that declare more than they hold") {
  const fs::path d = scratch("input_kinds");
  const std::size_t T = 10, E = 4;
  const std::string good = (d / "logits.npy").string();
  save_matrix(d / "logits.npy", to_float(random_logits(T * E, 8)), T, E);
  const fs::path fifo = d / "fifo";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);  // no writer: a blocking open or read would hang
  // A hand-written header declaring 10^6 x 10^6 float32 (4 TB), with a 100-byte body.
  {
    std::string h = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }";
    while ((10 + h.size() + 1) % 64 != 0) h += ' ';
    h += '\n';
    std::string f = "\x93NUMPY\x01";
    f += '\0';
    f += static_cast<char>(h.size() & 0xff);
    f += static_cast<char>(h.size() >> 8);
    std::ofstream(d / "huge.npy", std::ios::binary) << f << h << std::string(100, '\0');
  }
  const std::string out = (d / "out").string();
  struct bad_case {
    std::vector<std::string> args;
    std::string expect;
  };
  std::vector<bad_case> cases = {
      {{"--logits", (d / "huge.npy").string()},
       "--logits '" + (d / "huge.npy").string() +
           "': truncated data: shape (1000000, 1000000) of '<f4' needs 4000000000000 bytes, the file has 100"},
      {{"--logits", d.string()}, "--logits '" + d.string() + "': not a regular file: it is a directory"},
      {{"--logits", fifo.string()}, "--logits '" + fifo.string() + "': not a regular file: it is a FIFO"},
      {{"--logits", good, "--expert-bias", fifo.string()},
       "--expert-bias '" + fifo.string() + "': not a regular file: it is a FIFO"},
      {{"--logits", good, "--expert-bias", d.string()}, "--expert-bias '" + d.string() + "': not a regular file"},
  };
  if (fs::exists("/dev/zero")) {  // an endless stream
    cases.push_back({{"--logits", "/dev/zero"}, "--logits '/dev/zero': not a regular file: it is a character device"});
    cases.push_back({{"--logits", good, "--expert-bias", "/dev/zero"},
                     "--expert-bias '/dev/zero': not a regular file: it is a character device"});
  }
  for (auto& c : cases) {
    c.args.insert(c.args.end(), {"--out", out});
    std::string cmd;
    for (const auto& a : c.args) cmd += a + " ";
    CAPTURE(cmd);
    check_rejected(run_tool(d, c.args, "timeout 20"), c.expect, out, d);  // 124 if it hung
  }
}

TEST_CASE("cli: numeric options at and past their documented maxima") {
  const fs::path d = scratch("maxima");
  const std::size_t T = 10, E = 4;
  const std::string good = (d / "logits.npy").string();
  save_matrix(d / "logits.npy", to_float(random_logits(T * E, 9)), T, E);
  // 2048 experts: 2048 x 2^20 aligned slots would not fit in 32-bit slot ids.
  const std::string wide = (d / "wide.npy").string();
  save_matrix(d / "wide.npy", to_float(random_logits(2048, 10)), 1, 2048);
  const std::string out = (d / "out").string();

  SUBCASE("past the maxima: exit 2 with a clear message, without looping or allocating") {
    const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
        {{"--direction", "sinkhorn", "--sinkhorn-iterations", "1000001"},
         "--sinkhorn-iterations: expected a value in [1, 1000000], got 1000001"},
        {{"--capacity-factor", "1", "--drop", "random", "--seed", "18446744073709551616"},
         "--seed: integer out of range: '18446744073709551616'"},
        {{"--capacity-factor", "1", "--drop", "random", "--seed", "0x10"}, "--seed: expected a non-negative integer"},
        {{"--align", "1048577"}, "--align: expected a value in [1, 1048576], got 1048577"},
        {{"--align", "9223372036854775807"}, "--align: expected a value in [1, 1048576]"},
        {{"--capacity-factor", "1", "--min-capacity", "2147483648"},
         "--min-capacity: expected a value in [0, 2147483647], got 2147483648"},
        {{"--capacity-factor", "1", "--min-capacity", "2147483647", "--pad-to-capacity"},
         "slot count fits in 32-bit ids"},
        {{"--top-k", "2147483648"}, "--top-k: expected a value in [1, 2147483647], got 2147483648"},
        {{"--top-k", "2147483647"}, "--top-k: expected 1 <= top_k <= num_experts (4)"},
        {{"--num-groups", "2147483648", "--group-topk", "1"}, "--num-groups: expected a value in [0, 2147483647]"},
        {{"--num-groups", "2147483647", "--group-topk", "1"}, "--num-groups: expected a divisor of num_experts"},
        {{"--num-groups", "2", "--group-topk", "2147483648"}, "--group-topk: expected a value in [0, 2147483647]"},
        {{"--num-groups", "2", "--group-topk", "2147483647"}, "--group-topk: expected 1 <= group_topk <= num_groups"},
        {{"--capacity", "lower-bound", "--tokens-per-sample", "2147483648"},
         "--tokens-per-sample: expected a value in [0, 2147483647], got 2147483648"},
        {{"--capacity", "lower-bound", "--hidden-size", "2147483648"},
         "--hidden-size: expected a value in [1, 2147483647], got 2147483648"},
        {{"--ranks", "513"}, "--ranks: expected a value in [1, 512], got 513"},
        {{"--ranks", "2", "--ranks-per-node", "513"}, "--ranks-per-node: expected a value in [1, 512]"},
        {{"--ranks", "2", "--node-limit", "513"}, "--node-limit: expected a value in [1, 512]"},
        {{"--ranks", "2", "--row-bytes", "1073741825"}, "--row-bytes: expected a value in [1, 1073741824]"},
        {{"--capacity-factor", "1e300"}, "--capacity-factor: expected a capacity that fits in 32 bits"},
    };
    for (const auto& [extra, expect] : cases) {
      std::vector<std::string> args = {"--logits", good, "--out", out};
      args.insert(args.end(), extra.begin(), extra.end());
      std::string cmd;
      for (const auto& a : args) cmd += a + " ";
      CAPTURE(cmd);
      check_rejected(run_tool(d, args, "timeout 20"), expect, out, d);
    }
    check_rejected(run_tool(d, {"--logits", wide, "--out", out, "--align", "1048576"}, "timeout 20"),
                   "slot count fits in 32-bit ids", out, d);
  }

  SUBCASE("at the maxima: routed") {
    const std::vector<std::vector<std::string>> cases = {
        {"--direction", "sinkhorn", "--sinkhorn-iterations", "1000000"},
        {"--capacity-factor", "1", "--drop", "random", "--seed", "18446744073709551615"},
        {"--align", "1048576"},
        {"--capacity-factor", "1", "--min-capacity", "2147483647"},
        {"--capacity", "lower-bound", "--delta", "0.1", "--hidden-size", "2147483647", "--tokens-per-sample",
         "2147483647"},
        {"--ranks", "512", "--placement", "round-robin", "--row-bytes", "1073741824"},
    };
    for (const auto& extra : cases) {
      fs::remove_all(out);
      std::vector<std::string> args = {"--logits", good, "--out", out};
      args.insert(args.end(), extra.begin(), extra.end());
      std::string cmd;
      for (const auto& a : args) cmd += a + " ";
      CAPTURE(cmd);
      const run_result r = run_tool(d, args, "timeout 60");
      CHECK_MESSAGE(r.status == 0, r.err);
      CHECK(fs::exists(fs::path(out) / "stats.json"));
      CHECK(!has_temp_leftovers(d));
    }
  }
}

TEST_CASE("cli: an output that cannot be written in full exits 2 and leaves nothing at --out") {
  const fs::path d = scratch("write_fail");
  const std::size_t T = 200, E = 4;  // probs.npy alone is over 3 KB
  const std::string in = (d / "logits.npy").string();
  save_matrix(d / "logits.npy", to_float(random_logits(T * E, 11)), T, E);
  // A 1-block (512-byte) file-size limit, SIGXFSZ ignored: writes past it fail with EFBIG, as a full
  // disk fails with ENOSPC. stderr's single line stays under the limit.
  const std::string limit = "trap '' XFSZ; ulimit -f 1;";
  const fs::path out = d / "out";
  const run_result r = run_tool(d, {"--logits", in, "--out", out.string()}, limit);
  check_rejected(r, "--out '" + out.string() + "': cannot write '", out, d);
  CHECK(r.err.find(std::strerror(EFBIG)) != std::string::npos);

  // An existing --out directory receives nothing.
  fs::create_directories(out);
  const run_result into = run_tool(d, {"--logits", in, "--out", out.string()}, limit);
  CHECK(into.status == 2);
  CHECK(into.out.empty());
  CHECK(std::count(into.err.begin(), into.err.end(), '\n') == 1);
  CHECK(fs::is_empty(out));
  CHECK(!has_temp_leftovers(d));

  // Without the limit the same run succeeds.
  fs::remove_all(out);
  CHECK(run_tool(d, {"--logits", in, "--out", out.string()}).status == 0);
  CHECK(fs::exists(out / "stats.json"));
}

TEST_CASE("cli: --out names up to NAME_MAX bytes") {
  const fs::path d = scratch("long_name");
  const std::size_t T = 10, E = 4;
  const std::string in = (d / "logits.npy").string();
  save_matrix(d / "logits.npy", to_float(random_logits(T * E, 12)), T, E);
  for (std::size_t n : {std::size_t{250}, std::size_t{255}}) {
    CAPTURE(n);
    const fs::path out = d / std::string(n, 'o');
    const run_result r = run_tool(d, {"--logits", in, "--out", out.string()});
    CHECK_MESSAGE(r.status == 0, r.err);
    CHECK(fs::exists(out / "stats.json"));
    CHECK(!has_temp_leftovers(d));
    fs::remove_all(out);
  }
  const fs::path too_long = d / std::string(256, 'o');
  const run_result r = run_tool(d, {"--logits", in, "--out", too_long.string()});
  check_rejected(r, "--out '" + too_long.string() + "': " + std::strerror(ENAMETOOLONG), too_long, d);
}
