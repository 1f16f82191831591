#pragma once

// A small reader and writer of NumPy's .npy format (format versions 1.0 and 2.0), for the command-line
// tool and its tests. It reads little-endian, C-order arrays of float32 ('<f4'), float64 ('<f8'),
// uint8 ('|u1') and int32 ('<i4'); it writes the same dtypes with a version 1.0 header padded so that
// the data starts on a 64-byte boundary. Anything else is rejected with an npy::error that says why.
//
// The format (numpy.lib.format): the magic "\x93NUMPY", one byte major and one byte minor version, the
// header length (2 bytes little-endian in 1.0, 4 bytes in 2.0), then an ASCII Python dict literal
// {'descr': ..., 'fortran_order': ..., 'shape': (...), } padded with spaces and ending in '\n', then
// the raw elements.
//
// load() reads only regular files (a directory, device, FIFO or socket is refused without blocking on
// it), and checks the byte count the header declares against the file size before it allocates for
// the data: a header that claims more than the file holds costs nothing.

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <limits>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <sys/stat.h>
#include <unistd.h>
#include <utility>
#include <vector>

namespace resonance::tools::npy {

// Elements are copied byte for byte: the host must store them little-endian, as the files do.
static_assert(std::endian::native == std::endian::little, "npy.hpp reads and writes little-endian data only");

// Every malformed or unsupported file. The message says what is wrong; the caller adds the path.
class error : public std::runtime_error {
 public:
  explicit error(const std::string& what) : std::runtime_error(what) {}
};

enum class dtype : unsigned char { float32, float64, uint8, int32 };

constexpr std::string_view descr(dtype t) {
  switch (t) {
    case dtype::float32:
      return "<f4";
    case dtype::float64:
      return "<f8";
    case dtype::uint8:
      return "|u1";
    case dtype::int32:
      return "<i4";
  }
  return "?";
}

constexpr std::size_t item_size(dtype t) {
  switch (t) {
    case dtype::float32:
      return 4;
    case dtype::float64:
      return 8;
    case dtype::uint8:
      return 1;
    case dtype::int32:
      return 4;
  }
  return 0;
}

template <class T>
struct dtype_of_t;
template <>
struct dtype_of_t<float> {
  static constexpr dtype value = dtype::float32;
};
template <>
struct dtype_of_t<double> {
  static constexpr dtype value = dtype::float64;
};
template <>
struct dtype_of_t<std::uint8_t> {
  static constexpr dtype value = dtype::uint8;
};
template <>
struct dtype_of_t<std::int32_t> {
  static constexpr dtype value = dtype::int32;
};
template <class T>
inline constexpr dtype dtype_of = dtype_of_t<T>::value;

// "(3, 4)", "(5,)", "()": the shape as Python prints a tuple.
inline std::string shape_string(std::span<const std::size_t> shape) {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(shape[i]);
  }
  if (shape.size() == 1) s += ",";
  return s + ")";
}

// A decoded array: dtype, shape and the raw little-endian C-order element bytes.
struct array {
  dtype type = dtype::float32;
  std::vector<std::size_t> shape;
  std::vector<unsigned char> bytes;

  std::size_t ndim() const { return shape.size(); }
  std::size_t size() const {
    std::size_t n = 1;
    for (std::size_t d : shape) n *= d;
    return n;
  }

  // The elements as T; T must be exactly the stored dtype (no silent conversion).
  template <class T>
  std::vector<T> values() const {
    if (dtype_of<T> != type)
      throw error("dtype is '" + std::string(descr(type)) + "', not '" + std::string(descr(dtype_of<T>)) + "'");
    std::vector<T> out(size());
    if (!out.empty()) std::memcpy(out.data(), bytes.data(), out.size() * sizeof(T));
    return out;
  }
};

namespace detail {

// A cursor over the header's dict literal: the subset of Python syntax that np.save writes (string
// keys and values in either quote, True/False, tuples of non-negative integers).
class header_parser {
 public:
  explicit header_parser(std::string_view text) : s_(text) {}

  void skip_space() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  bool at_end() {
    skip_space();
    return i_ == s_.size();
  }
  bool consume(char c) {
    skip_space();
    if (i_ < s_.size() && s_[i_] == c) {
      ++i_;
      return true;
    }
    return false;
  }
  void expect(char c, std::string_view what) {
    if (!consume(c)) fail(std::string("expected ") + std::string(what));
  }
  bool peek(char c) {
    skip_space();
    return i_ < s_.size() && s_[i_] == c;
  }

  std::string string_literal() {
    skip_space();
    if (i_ >= s_.size() || (s_[i_] != '\'' && s_[i_] != '"')) fail("expected a quoted string");
    const char quote = s_[i_++];
    const std::size_t begin = i_;
    while (i_ < s_.size() && s_[i_] != quote) {
      if (s_[i_] == '\\') fail("escape sequences in strings are not supported");
      ++i_;
    }
    if (i_ >= s_.size()) fail("unterminated string");
    return std::string(s_.substr(begin, i_++ - begin));
  }

  bool boolean() {
    skip_space();
    if (s_.substr(i_, 4) == "True") {
      i_ += 4;
      return true;
    }
    if (s_.substr(i_, 5) == "False") {
      i_ += 5;
      return false;
    }
    fail("expected True or False");
  }

  std::vector<std::size_t> tuple() {
    expect('(', "'(' to open the shape tuple");
    std::vector<std::size_t> dims;
    bool trailing_comma = false;
    while (!consume(')')) {
      if (!dims.empty() && !trailing_comma) fail("expected ',' or ')' in the shape tuple");
      dims.push_back(integer());
      trailing_comma = consume(',');
    }
    // Python needs the comma of a 1-tuple; "(5)" is the integer 5, not a shape.
    if (dims.size() == 1 && !trailing_comma) fail("the shape (n) is not a tuple; expected (n,)");
    return dims;
  }

  [[noreturn]] void fail(const std::string& what) const {
    throw error("malformed header: " + what + " at offset " + std::to_string(i_) + " of '" + printable() + "'");
  }

 private:
  std::size_t integer() {
    skip_space();
    if (i_ >= s_.size() || s_[i_] < '0' || s_[i_] > '9') fail("expected a non-negative integer in the shape");
    std::size_t v = 0;
    while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') {
      const auto digit = static_cast<std::size_t>(s_[i_] - '0');
      if (v > (std::numeric_limits<std::size_t>::max() - digit) / 10) fail("dimension too large");
      v = v * 10 + digit;
      ++i_;
    }
    if (i_ < s_.size() && s_[i_] == 'L') ++i_;  // Python 2 long literal, written by old NumPy
    return v;
  }

  // The header without its padding, for messages.
  std::string printable() const {
    std::string_view t = s_;
    while (!t.empty() && (t.back() == ' ' || t.back() == '\n')) t.remove_suffix(1);
    return std::string(t.substr(0, 200));
  }

  std::string_view s_;
  std::size_t i_ = 0;
};

inline dtype parse_descr(const std::string& d) {
  for (dtype t : {dtype::float32, dtype::float64, dtype::uint8, dtype::int32})
    if (d == descr(t)) return t;
  if (d == "<u1") return dtype::uint8;  // byte order is meaningless for one byte
  if (!d.empty() && d[0] == '>')
    throw error("big-endian dtype '" + d + "' is not supported (expected '<f4', '<f8', '|u1' or '<i4')");
  throw error("unsupported dtype '" + d + "' (expected '<f4', '<f8', '|u1' or '<i4')");
}

inline std::uint32_t read_le(const unsigned char* p, std::size_t n) {
  std::uint32_t v = 0;
  for (std::size_t i = n; i-- > 0;) v = (v << 8) | p[i];
  return v;
}

}  // namespace detail

inline constexpr std::string_view magic = "\x93NUMPY";

namespace detail {

// The length of the prefix (magic, version, header length, header) that `head`, the first bytes of a
// file of `file_size` bytes, announces; `head` needs at most 12 bytes for this.
inline std::size_t data_start(std::string_view head, std::size_t file_size) {
  const auto* u = reinterpret_cast<const unsigned char*>(head.data());
  if (head.size() < 8 || head.substr(0, 6) != magic) throw error("not a .npy file (bad magic string)");
  const unsigned major = u[6], minor = u[7];
  if ((major != 1 && major != 2) || minor != 0)
    throw error("unsupported .npy format version " + std::to_string(major) + "." + std::to_string(minor) +
                " (expected 1.0 or 2.0)");
  const std::size_t len_bytes = major == 1 ? 2 : 4;
  if (head.size() < 8 + len_bytes) throw error("truncated header (file ends inside the header length)");
  const std::size_t header_len = detail::read_le(u + 8, len_bytes);
  const std::size_t start = 8 + len_bytes + header_len;
  if (file_size < start)
    throw error("truncated header (" + std::to_string(header_len) + " header bytes announced, " +
                std::to_string(file_size - 8 - len_bytes) + " present)");
  return start;
}

// A decoded header: the array without its bytes, where its data starts and how many bytes it has.
struct header_info {
  array a;
  std::size_t data_start = 0;
  std::size_t nbytes = 0;
};

// Decodes the header at the start of `head` (which holds at least data_start() bytes) of a file of
// `file_size` bytes, and checks that the file holds exactly the data the shape declares: nothing is
// allocated for the data before this passes.
inline header_info parse_header(std::string_view head, std::size_t file_size) {
  const std::size_t start = data_start(head, file_size);
  const std::size_t len_bytes = static_cast<unsigned char>(head[6]) == 1 ? 2 : 4;
  if (head.size() < start) throw error("truncated header");
  const std::string_view header = head.substr(8 + len_bytes, start - 8 - len_bytes);
  for (char c : header)
    if (static_cast<unsigned char>(c) >= 0x7f ||
        (static_cast<unsigned char>(c) < 0x20 && c != '\n' && c != '\t' && c != '\r'))
      throw error("malformed header: non-ASCII or control byte in the header");

  detail::header_parser p(header);
  p.expect('{', "'{' to open the header dict");
  bool has_descr = false, has_order = false, has_shape = false;
  array a;
  while (!p.consume('}')) {
    const std::string key = p.string_literal();
    p.expect(':', "':' after a key");
    if (key == "descr") {
      if (has_descr) p.fail("duplicate key 'descr'");
      if (!p.peek('\'') && !p.peek('"')) throw error("unsupported dtype (structured or non-string descr)");
      a.type = detail::parse_descr(p.string_literal());
      has_descr = true;
    } else if (key == "fortran_order") {
      if (has_order) p.fail("duplicate key 'fortran_order'");
      if (p.boolean()) throw error("fortran_order True is not supported (save a C-order array)");
      has_order = true;
    } else if (key == "shape") {
      if (has_shape) p.fail("duplicate key 'shape'");
      a.shape = p.tuple();
      has_shape = true;
    } else {
      p.fail("unexpected key '" + key + "'");
    }
    if (!p.consume(',')) {
      p.expect('}', "',' or '}' after a value");
      break;
    }
  }
  if (!p.at_end()) p.fail("text after the header dict");
  if (!has_descr || !has_order || !has_shape)
    throw error(std::string("malformed header: missing key '") +
                (!has_descr   ? "descr"
                 : !has_order ? "fortran_order"
                              : "shape") +
                "'");

  std::size_t count = 1;
  for (std::size_t d : a.shape) {
    if (d != 0 && count > std::numeric_limits<std::size_t>::max() / d) throw error("shape too large");
    count *= d;
  }
  const std::size_t item = item_size(a.type);
  if (count > std::numeric_limits<std::size_t>::max() / item) throw error("shape too large");
  const std::size_t nbytes = count * item;
  const std::size_t present = file_size - start;
  if (present < nbytes)
    throw error("truncated data: shape " + shape_string(a.shape) + " of '" + std::string(descr(a.type)) + "' needs " +
                std::to_string(nbytes) + " bytes, the file has " + std::to_string(present));
  if (present > nbytes)
    throw error(std::to_string(present - nbytes) + " unexpected bytes after the data of shape " +
                shape_string(a.shape));
  return {std::move(a), start, nbytes};
}

// An open file descriptor, closed on scope exit.
class file_descriptor {
 public:
  explicit file_descriptor(int fd) : fd_(fd) {}
  file_descriptor(const file_descriptor&) = delete;
  file_descriptor& operator=(const file_descriptor&) = delete;
  ~file_descriptor() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }
  // Closes now and reports the result (close can report a delayed write error).
  bool close() {
    const int fd = fd_;
    fd_ = -1;
    return ::close(fd) == 0;
  }

 private:
  int fd_;
};

inline std::string errno_text() { return std::strerror(errno); }

// Opens `path` for reading if it is a regular file. O_NONBLOCK keeps the open of a FIFO without a
// writer from blocking; it is cleared again before reading. Sets `size` to the file size.
inline int open_regular(const std::string& path, std::size_t& size) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) throw error("cannot open: " + errno_text());
  file_descriptor guard(fd);
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw error("cannot stat: " + errno_text());
  const char* kind = S_ISDIR(st.st_mode)    ? "a directory"
                     : S_ISCHR(st.st_mode)  ? "a character device"
                     : S_ISBLK(st.st_mode)  ? "a block device"
                     : S_ISFIFO(st.st_mode) ? "a FIFO (named pipe)"
                     : S_ISSOCK(st.st_mode) ? "a socket"
                     : S_ISREG(st.st_mode)  ? nullptr
                                            : "not a plain file";
  if (kind != nullptr) throw error(std::string("not a regular file: it is ") + kind);
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0) throw error("cannot open: " + errno_text());
  size = static_cast<std::size_t>(st.st_size);
  return guard.release();
}

// Reads exactly n bytes into p; a file that is shorter than its size said is an error.
inline void read_exact(int fd, unsigned char* p, std::size_t n) {
  while (n > 0) {
    const ::ssize_t got = ::read(fd, p, n);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) throw error("read error: " + errno_text());
    if (got == 0) throw error("the file shrank while it was read");
    p += got;
    n -= static_cast<std::size_t>(got);
  }
}

}  // namespace detail

// Decodes the full contents of a .npy file.
inline array parse(std::string_view file) {
  detail::header_info h = detail::parse_header(file, file.size());
  const auto* u = reinterpret_cast<const unsigned char*>(file.data());
  h.a.bytes.assign(u + h.data_start, u + h.data_start + h.nbytes);
  return std::move(h.a);
}

// Reads a whole regular file (see load). The error message does not repeat the path; the caller
// names the file.
inline std::string read_file(const std::string& path) {
  std::size_t size = 0;
  detail::file_descriptor fd(detail::open_regular(path, size));
  std::string data(size, '\0');
  detail::read_exact(fd.get(), reinterpret_cast<unsigned char*>(data.data()), size);
  return data;
}

// Reads a .npy file: the header first, then, once the shape is known to match the file size, the data
// straight into the array. Only regular files are read.
inline array load(const std::string& path) {
  std::size_t size = 0;
  detail::file_descriptor fd(detail::open_regular(path, size));
  // The magic, version and header length (at most 12 bytes), then the header they announce.
  std::string head(std::min<std::size_t>(size, 12), '\0');
  detail::read_exact(fd.get(), reinterpret_cast<unsigned char*>(head.data()), head.size());
  const std::size_t start = detail::data_start(head, size);
  const std::size_t prefix = head.size();
  // A header shorter than the bytes already read (0 or 1 bytes: parse_header rejects it) needs no read.
  head.resize(start);
  if (start > prefix)
    detail::read_exact(fd.get(), reinterpret_cast<unsigned char*>(head.data()) + prefix, start - prefix);
  else if (::lseek(fd.get(), static_cast<::off_t>(start), SEEK_SET) < 0)
    throw error("seek error: " + detail::errno_text());
  detail::header_info h = detail::parse_header(head, size);
  h.a.bytes.resize(h.nbytes);
  detail::read_exact(fd.get(), h.a.bytes.data(), h.nbytes);
  return std::move(h.a);
}

// A floating-point (float32 or float64) array of exactly `ndim` dimensions, or an error saying why not.
// `what` describes the expected shape in the message, e.g. "a 2-D array (tokens x experts)".
inline void require_float(const array& a, std::size_t ndim, std::string_view what) {
  if (a.type != dtype::float32 && a.type != dtype::float64)
    throw error("expected float32 ('<f4') or float64 ('<f8'), got '" + std::string(descr(a.type)) + "'");
  if (a.ndim() != ndim) throw error("expected " + std::string(what) + ", got shape " + shape_string(a.shape));
}

// The bytes of a .npy file (format 1.0) holding `shape` elements of type t from `data`.
inline std::string encode(dtype t, std::span<const std::size_t> shape, const void* data) {
  std::string header =
      "{'descr': '" + std::string(descr(t)) + "', 'fortran_order': False, 'shape': " + shape_string(shape) + ", }";
  // magic (6) + version (2) + length (2) + header + '\n' is padded with spaces to a multiple of 64, so
  // that the data is aligned for any element type (as np.save does).
  const std::size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  if (header.size() > 0xffff) throw error("header too long for format 1.0");
  std::size_t count = 1;
  for (std::size_t d : shape) count *= d;
  const std::size_t nbytes = count * item_size(t);
  std::string out;
  out.reserve(10 + header.size() + nbytes);
  out += magic;
  out += '\x01';
  out += '\x00';
  out += static_cast<char>(header.size() & 0xff);
  out += static_cast<char>((header.size() >> 8) & 0xff);
  out += header;
  if (nbytes > 0) out.append(static_cast<const char*>(data), nbytes);
  return out;
}

template <class T>
std::string encode(std::span<const T> values, std::span<const std::size_t> shape) {
  std::size_t count = 1;
  for (std::size_t d : shape) count *= d;
  if (count != values.size())
    throw error("shape " + shape_string(shape) + " does not match " + std::to_string(values.size()) + " values");
  return encode(dtype_of<T>, shape, values.data());
}

// Writes `bytes` to `path` and fsyncs it, checking every write, the fsync and the close: a full disk
// or an I/O error throws (and removes the short file) instead of leaving a silently truncated one.
inline void write_file(const std::string& path, std::string_view bytes) {
  const int raw = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOCTTY, 0666);
  if (raw < 0) throw error("cannot create '" + path + "': " + detail::errno_text());
  detail::file_descriptor fd(raw);
  struct stat st {};
  const bool regular = ::fstat(raw, &st) == 0 && S_ISREG(st.st_mode);
  const auto failed = [&](const char* what) {
    const std::string reason = detail::errno_text();
    if (regular) ::unlink(path.c_str());  // the short file; never a device such as /dev/full
    throw error(std::string(what) + " '" + path + "': " + reason);
  };
  const char* p = bytes.data();
  std::size_t left = bytes.size();
  while (left > 0) {
    const ::ssize_t n = ::write(fd.get(), p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n == 0) errno = EIO;
      failed("cannot write");
    }
    p += n;
    left -= static_cast<std::size_t>(n);
  }
  if (::fsync(fd.get()) != 0 && errno != EINVAL && errno != EROFS) failed("cannot write");
  if (!fd.close()) failed("cannot write");
}

template <class T>
void save(const std::string& path, std::span<const T> values, std::span<const std::size_t> shape) {
  write_file(path, encode(values, shape));
}

}  // namespace resonance::tools::npy
