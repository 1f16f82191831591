// fuzz_npy: the .npy reader of resonance-route (tools/npy.hpp) on arbitrary bytes.
//
// Each input is read twice: by parse() from memory, and by load() from a file holding the same bytes
// (a memfd, so the disk is never touched), which is what the tool calls. A finding is:
//   - a crash, a sanitizer report, an allocation past -malloc_limit_mb (load() must size nothing from
//     the header before checking it against the file size), an exception other than npy::error;
//   - the two reads disagreeing (error message, or dtype, shape and bytes);
//   - an array whose shape's element count overflows, or whose bytes are not count × item size;
//   - an array that encode() then parse() does not give back unchanged;
//   - values<T>() of the stored dtype not giving the bytes as count elements, or of another dtype not
//     being an npy::error.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <limits>
#include <string>
#include <string_view>
#include <sys/mman.h>
#include <unistd.h>
#include <vector>

#include "npy.hpp"

namespace {

namespace npy = resonance::tools::npy;

[[noreturn]] void finding(const std::string& what) {
  std::fprintf(stderr, "resonance fuzz finding: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

void require(bool ok, const std::string& what) {
  if (!ok) finding(what);
}

// A file the inputs are written to, opened by path as the tool opens its --logits: a memfd through
// /proc/self/fd, or a temporary file where memfds are missing.
class scratch_file {
 public:
  scratch_file() {
    fd_ = ::memfd_create("fuzz_npy", MFD_CLOEXEC);
    if (fd_ >= 0) {
      path_ = "/proc/self/fd/" + std::to_string(fd_);
      return;
    }
    const char* dir = std::getenv("TMPDIR");
    std::string pattern = std::string(dir != nullptr && *dir != '\0' ? dir : "/tmp") + "/fuzz_npy.XXXXXX";
    fd_ = ::mkstemp(pattern.data());
    if (fd_ < 0) finding("cannot create a scratch file");
    path_ = pattern;
    unlink_ = true;
  }
  ~scratch_file() {
    ::close(fd_);
    if (unlink_) ::unlink(path_.c_str());
  }
  scratch_file(const scratch_file&) = delete;
  scratch_file& operator=(const scratch_file&) = delete;

  // Replaces the contents with `bytes`; returns the path.
  const std::string& holding(std::string_view bytes) {
    if (::ftruncate(fd_, 0) != 0) finding("cannot truncate the scratch file");
    std::size_t done = 0;
    while (done < bytes.size()) {
      const ::ssize_t n = ::pwrite(fd_, bytes.data() + done, bytes.size() - done, static_cast<::off_t>(done));
      if (n <= 0) finding("cannot write the scratch file");
      done += static_cast<std::size_t>(n);
    }
    return path_;
  }

 private:
  int fd_ = -1;
  std::string path_;
  bool unlink_ = false;
};

// A read's outcome: the npy::error message, or "" and the array.
struct outcome {
  std::string error;
  npy::array a;
};

template <class Read>
outcome read_with(Read&& read) {
  outcome o;
  try {
    o.a = read();
  } catch (const npy::error& e) {
    o.error = e.what();
    if (o.error.empty()) finding("an npy::error with an empty message");
  }
  return o;
}

bool same_array(const npy::array& x, const npy::array& y) {
  return x.type == y.type && x.shape == y.shape && x.bytes == y.bytes;
}

std::string shape_of(const npy::array& a) {
  return npy::shape_string(a.shape) + " of " + std::string(npy::descr(a.type));
}

// values<T>(): the bytes as elements for the stored dtype, an npy::error for any other.
template <class T>
void check_values(const npy::array& a, std::size_t count) {
  if (npy::dtype_of<T> != a.type) {
    bool threw = false;
    try {
      (void)a.values<T>();
    } catch (const npy::error&) {
      threw = true;
    }
    require(threw, "values<" + std::string(npy::descr(npy::dtype_of<T>)) + ">() of " + shape_of(a) + " did not throw");
    return;
  }
  const std::vector<T> v = a.values<T>();
  require(v.size() == count, "values() of " + shape_of(a) + " gave " + std::to_string(v.size()) + " elements");
  require(v.empty() || std::memcmp(v.data(), a.bytes.data(), a.bytes.size()) == 0,
          "values() of " + shape_of(a) + " differ from the bytes");
}

void check_array(const npy::array& a) {
  require(a.type == npy::dtype::float32 || a.type == npy::dtype::float64 || a.type == npy::dtype::uint8 ||
              a.type == npy::dtype::int32,
          "an array of an unknown dtype");
  std::size_t count = 1;
  for (std::size_t d : a.shape) {
    require(d == 0 || count <= std::numeric_limits<std::size_t>::max() / d, "the shape " + shape_of(a) + " overflows");
    count *= d;
  }
  require(a.size() == count, "size() of " + shape_of(a));
  require(a.bytes.size() == count * npy::item_size(a.type),
          shape_of(a) + " holds " + std::to_string(a.bytes.size()) + " bytes");

  check_values<float>(a, count);
  check_values<double>(a, count);
  check_values<std::uint8_t>(a, count);
  check_values<std::int32_t>(a, count);

  // What the tool would write back is read back the same. Only a shape too long for a format 1.0
  // header (65535 bytes; a 2.0 file can hold one) may refuse to encode.
  std::string again;
  try {
    again = npy::encode(a.type, a.shape, a.bytes.data());
  } catch (const npy::error& e) {
    require(npy::shape_string(a.shape).size() > 60000, "encode() of " + shape_of(a) + " threw: " + e.what());
    return;
  }
  const outcome back = read_with([&] { return npy::parse(again); });
  require(back.error.empty(), "the encoding of " + shape_of(a) + " does not parse: " + back.error);
  require(same_array(a, back.a), "the encoding of " + shape_of(a) + " parses to " + shape_of(back.a));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static scratch_file file;
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  const outcome parsed = read_with([&] { return npy::parse(bytes); });
  const std::string& path = file.holding(bytes);
  const outcome loaded = read_with([&] { return npy::load(path); });
  require(parsed.error == loaded.error, "parse() threw \"" + parsed.error + "\", load() \"" + loaded.error + "\"");
  if (!parsed.error.empty()) return 0;
  require(same_array(parsed.a, loaded.a), "parse() read " + shape_of(parsed.a) + ", load() " + shape_of(loaded.a));
  check_array(parsed.a);
  return 0;
}
