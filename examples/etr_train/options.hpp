#pragma once

// Command line of etr_train. Every bad argument is reported by name and ends the program with status 2.

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace etr {

struct options {
  std::string out = "etr_out";
  std::string text_path;  // empty: the GPL-3 copy next to the sources
  bool quick = false;
  bool run_synthetic = true;
  bool run_text = true;
  std::vector<std::string> arms;  // empty: all
  unsigned long long seed = 1;    // the first seed
  long seeds = 0;                 // seeds seed, seed + 1, ... (0: 3, or 1 with --quick); each runs every arm
  long layers = 2;                // MoE layers
  long jobs = 0;                  // runs trained at once (0: the hardware's threads)
  double locality = 0.01;         // μ of the locality loss on the LocMoE and ETR arms (etr_noloc: none)
  long steps = 0;                 // 0: the task default (synthetic 1500, text 500; 60 with --quick)
  long log_every = 0;             // 0: about 60 log points per run
  double lr = 3e-3;
  long experts = 8;
  long width = 64;        // d, the MoE width (a multiple of experts)
  long hidden = 32;       // expert FFN hidden size (synthetic; the text task uses 2x)
  long seq = 16;          // s, tokens per synthetic sample
  long batch = 64;        // synthetic samples per step (T = batch * seq tokens per routing call)
  double signal = 1.5;    // per-channel amplitude of the class pattern o_y on its channel group
  long context = 8;       // c, previous characters the text model reads
  long text_batch = 512;  // predictions per text step (one routing call)
  double tau = 0.1;       // softmax temperature on GrAP-cosine affinities (they lie in [-1, 1])
};

inline void usage(std::FILE* f) {
  std::fprintf(f,
               "usage: etr_train [--out DIR] [--quick] [--task synthetic|text|both] [--arms a,b,...]\n"
               "                 [--seed N] [--seeds N] [--layers N] [--jobs N] [--steps N] [--log-every N]\n"
               "                 [--lr X] [--experts N] [--width N] [--hidden N] [--seq N] [--batch N]\n"
               "                 [--signal X] [--context N] [--text-batch N] [--tau X] [--locality X]\n"
               "                 [--text FILE]\n"
               "arms: switch locmoe etr_tcr etr_ecr etr etr_noloc bias\n"
               "defaults: 3 seeds (1, 2, 3), 2 MoE layers, locality 0.01, all arms, both tasks\n");
}

[[noreturn]] inline void bad_argument(const std::string& arg, const std::string& why) {
  std::fprintf(stderr, "etr_train: bad argument %s: %s\n", arg.c_str(), why.c_str());
  usage(stderr);
  std::exit(2);
}

inline long parse_long(const std::string& arg, const char* text, long lo, long hi) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(text, &end, 10);
  if (end == text || *end != '\0' || errno != 0 || v < lo || v > hi)
    bad_argument(arg, std::string("expected an integer in [") + std::to_string(lo) + ", " + std::to_string(hi) +
                          "], got '" + text + "'");
  return v;
}

// A number in (lo, hi], or in [lo, hi] when `closed`.
inline double parse_double(const std::string& arg, const char* text, double lo, double hi, bool closed = false) {
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(text, &end);
  if (end == text || *end != '\0' || errno != 0 || !(closed ? v >= lo : v > lo) || !(v <= hi))
    bad_argument(arg, std::string("expected a number in ") + (closed ? "[" : "(") + std::to_string(lo) + ", " +
                          std::to_string(hi) + "], got '" + text + "'");
  return v;
}

inline const std::vector<std::string>& known_arms() {
  static const std::vector<std::string> names{"switch", "locmoe", "etr_tcr", "etr_ecr", "etr", "etr_noloc", "bias"};
  return names;
}

inline options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      usage(stdout);
      std::exit(0);
    }
    if (a == "--quick") {
      o.quick = true;
      continue;
    }
    if (a.rfind("--", 0) != 0) bad_argument(a, "not an option");
    if (i + 1 >= argc) bad_argument(a, "missing value");
    const char* v = argv[++i];
    if (a == "--out") {
      if (*v == '\0') bad_argument(a, "empty directory");
      o.out = v;
    } else if (a == "--text") {
      o.text_path = v;
    } else if (a == "--task") {
      const std::string t = v;
      if (t != "synthetic" && t != "text" && t != "both")
        bad_argument(a, "expected synthetic, text or both, got '" + t + "'");
      o.run_synthetic = t != "text";
      o.run_text = t != "synthetic";
    } else if (a == "--arms") {
      std::string list = v;
      std::size_t pos = 0;
      while (pos <= list.size()) {
        const std::size_t comma = list.find(',', pos);
        const std::string name = list.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
        bool known = false;
        for (const auto& k : known_arms()) known = known || k == name;
        if (!known) bad_argument(a, "unknown arm '" + name + "'");
        o.arms.push_back(name);
        if (comma == std::string::npos) break;
        pos = comma + 1;
      }
    } else if (a == "--seed") {
      o.seed = static_cast<unsigned long long>(parse_long(a, v, 0, 2147483647L));
    } else if (a == "--seeds") {
      o.seeds = parse_long(a, v, 1, 100);
    } else if (a == "--layers") {
      o.layers = parse_long(a, v, 1, 16);
    } else if (a == "--jobs") {
      o.jobs = parse_long(a, v, 1, 256);
    } else if (a == "--locality") {
      o.locality = parse_double(a, v, 0.0, 100.0, true);
    } else if (a == "--steps") {
      o.steps = parse_long(a, v, 1, 10000000L);
    } else if (a == "--log-every") {
      o.log_every = parse_long(a, v, 1, 10000000L);
    } else if (a == "--lr") {
      o.lr = parse_double(a, v, 0.0, 1.0);
    } else if (a == "--experts") {
      o.experts = parse_long(a, v, 2, 64);
    } else if (a == "--width") {
      o.width = parse_long(a, v, 2, 4096);
    } else if (a == "--hidden") {
      o.hidden = parse_long(a, v, 1, 4096);
    } else if (a == "--seq") {
      o.seq = parse_long(a, v, 2, 4096);
    } else if (a == "--batch") {
      o.batch = parse_long(a, v, 2, 65536);
    } else if (a == "--signal") {
      o.signal = parse_double(a, v, 0.0, 100.0);
    } else if (a == "--context") {
      o.context = parse_long(a, v, 1, 64);
    } else if (a == "--text-batch") {
      o.text_batch = parse_long(a, v, 8, 65536);
    } else if (a == "--tau") {
      o.tau = parse_double(a, v, 0.0, 100.0);
    } else {
      bad_argument(a, "unknown option");
    }
  }
  if (o.seeds == 0) o.seeds = o.quick ? 1 : 3;
  if (o.width % o.experts != 0)
    bad_argument("--width", "must be a multiple of --experts (" + std::to_string(o.experts) + ")");
  if (o.experts > 8 && o.run_synthetic)
    bad_argument("--experts", "at most 8 with the synthetic task (its success rate matches classes to experts)");
  return o;
}

}  // namespace etr
