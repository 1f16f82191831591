// The .npy reader and writer of tools/npy.hpp. Reader inputs are byte strings built by hand here from
// the format's definition (numpy.lib.format), so the reader is not only checked against its own writer.

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <sys/stat.h>
#include <vector>

#include <doctest/doctest.h>

#include "npy.hpp"

namespace npy = resonance::tools::npy;

namespace {

// Magic, version, little-endian header length (2 bytes for 1.x, 4 for 2.x), header text, data.
std::string npy_file(unsigned major, unsigned minor, const std::string& header, const std::string& data) {
  std::string f = "\x93NUMPY";
  f += static_cast<char>(major);
  f += static_cast<char>(minor);
  const std::size_t n = header.size();
  f += static_cast<char>(n & 0xff);
  f += static_cast<char>((n >> 8) & 0xff);
  if (major >= 2) {
    f += static_cast<char>((n >> 16) & 0xff);
    f += static_cast<char>((n >> 24) & 0xff);
  }
  return f + header + data;
}

// A header padded with spaces and a final newline so that the data starts at a multiple of 64.
std::string padded(const std::string& dict, std::size_t prefix = 10) {
  std::string h = dict;
  while ((prefix + h.size() + 1) % 64 != 0) h += ' ';
  return h + '\n';
}

std::string bytes(std::initializer_list<unsigned> b) {
  std::string s;
  for (unsigned x : b) s += static_cast<char>(x);
  return s;
}

template <class T>
std::string raw(const std::vector<T>& v) {
  std::string s(v.size() * sizeof(T), '\0');
  if (!v.empty()) std::memcpy(s.data(), v.data(), s.size());
  return s;
}

// The message of the npy::error that parsing `file` throws; "" when it parses.
std::string parse_error(const std::string& file) {
  try {
    (void)npy::parse(file);
  } catch (const npy::error& e) {
    return e.what();
  }
  return "";
}

const std::string f4_2x3 = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";

}  // namespace

TEST_CASE("npy: reads a float32 matrix written the way np.save writes it") {
  // np.save(np.array([[1, 2, -1.5], [0.5, 0, -2]], np.float32)) with NumPy 1.24: a 118-byte header.
  std::string header = f4_2x3;
  header.append(117 - header.size(), ' ');
  header += '\n';
  const std::string data = bytes({0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0xc0, 0xbf,
                                  0x00, 0x00, 0x00, 0x3f, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc0});
  const npy::array a = npy::parse(npy_file(1, 0, header, data));
  CHECK(a.type == npy::dtype::float32);
  CHECK(a.shape == std::vector<std::size_t>{2, 3});
  CHECK(a.ndim() == 2);
  CHECK(a.size() == 6);
  CHECK(a.values<float>() == std::vector<float>{1.0f, 2.0f, -1.5f, 0.5f, 0.0f, -2.0f});
  CHECK_THROWS_AS((void)a.values<double>(), npy::error);
}

TEST_CASE("npy: reads version 2.0 headers") {
  const std::string data = bytes({0, 0, 0, 0, 0, 0, 0xf0, 0x3f, 0, 0, 0, 0, 0, 0, 0x08, 0xc0});  // 1.0, -3.0
  const npy::array a =
      npy::parse(npy_file(2, 0, padded("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }", 12), data));
  CHECK(a.type == npy::dtype::float64);
  CHECK(a.shape == std::vector<std::size_t>{2});
  CHECK(a.values<double>() == std::vector<double>{1.0, -3.0});
}

TEST_CASE("npy: header syntax variants that NumPy accepts") {
  const std::string data = raw(std::vector<float>{1, 2, 3, 4, 5, 6});
  for (const std::string& dict : {
           std::string("{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (2, 3)}"),  // double quotes
           std::string("{'shape': (2,3), 'fortran_order': False, 'descr': '<f4'}"),           // key order
           std::string("{ 'descr' : '<f4' , 'fortran_order' : False , 'shape' : ( 2 , 3 , ) , }"),
           std::string("{'descr': '<f4', 'fortran_order': False, 'shape': (2L, 3L), }"),  // Python 2 longs
       }) {
    CAPTURE(dict);
    const npy::array a = npy::parse(npy_file(1, 0, padded(dict), data));
    CHECK(a.shape == std::vector<std::size_t>{2, 3});
    CHECK(a.values<float>()[5] == 6.0f);
  }
  // Older NumPy aligned the data to 16 bytes only, and the final newline is not required.
  const std::string h16 = f4_2x3 + std::string(16 - (10 + f4_2x3.size() + 1) % 16, ' ') + "\n";
  CHECK(npy::parse(npy_file(1, 0, h16, data)).size() == 6);
  CHECK(npy::parse(npy_file(1, 0, f4_2x3, data)).size() == 6);
}

TEST_CASE("npy: shapes and integer dtypes") {
  SUBCASE("(0, n): no data") {
    const npy::array a =
        npy::parse(npy_file(1, 0, padded("{'descr': '<f8', 'fortran_order': False, 'shape': (0, 4), }"), ""));
    CHECK(a.shape == std::vector<std::size_t>{0, 4});
    CHECK(a.size() == 0);
    CHECK(a.values<double>().empty());
    CHECK_NOTHROW(npy::require_float(a, 2, "a matrix"));
  }
  SUBCASE("(n,)") {
    const npy::array a = npy::parse(npy_file(1, 0, padded("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }"),
                                             raw(std::vector<float>{1, 2, 3})));
    CHECK(a.ndim() == 1);
    CHECK_NOTHROW(npy::require_float(a, 1, "a vector"));
    CHECK_THROWS_WITH_AS(npy::require_float(a, 2, "a 2-D array"), "expected a 2-D array, got shape (3,)", npy::error);
  }
  SUBCASE("a scalar () parses, but is neither a vector nor a matrix") {
    const npy::array a = npy::parse(
        npy_file(1, 0, padded("{'descr': '<f8', 'fortran_order': False, 'shape': (), }"), raw(std::vector<double>{7})));
    CHECK(a.ndim() == 0);
    CHECK(a.size() == 1);
    CHECK_THROWS_WITH_AS(npy::require_float(a, 1, "a vector"), "expected a vector, got shape ()", npy::error);
    CHECK_THROWS_AS(npy::require_float(a, 2, "a matrix"), npy::error);
  }
  SUBCASE("uint8 and int32") {
    const npy::array u = npy::parse(
        npy_file(1, 0, padded("{'descr': '|u1', 'fortran_order': False, 'shape': (2, 2), }"), bytes({0, 1, 255, 7})));
    CHECK(u.values<std::uint8_t>() == std::vector<std::uint8_t>{0, 1, 255, 7});
    CHECK_THROWS_WITH_AS(npy::require_float(u, 2, "a matrix"), "expected float32 ('<f4') or float64 ('<f8'), got '|u1'",
                         npy::error);
    const npy::array i = npy::parse(npy_file(1, 0, padded("{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }"),
                                             bytes({0xff, 0xff, 0xff, 0xff, 0x02, 0x01, 0x00, 0x00})));
    CHECK(i.values<std::int32_t>() == std::vector<std::int32_t>{-1, 258});
  }
}

TEST_CASE("npy: every malformed or unsupported file is rejected with a reason") {
  const std::string data = raw(std::vector<float>{1, 2, 3, 4, 5, 6});
  const std::string good = npy_file(1, 0, padded(f4_2x3), data);
  REQUIRE(parse_error(good).empty());
  auto with_dict = [&](const std::string& dict, const std::string& d = "") {
    return parse_error(npy_file(1, 0, padded(dict), d));
  };

  CHECK(parse_error("") == "not a .npy file (bad magic string)");
  CHECK(parse_error("\x93NUMP") == "not a .npy file (bad magic string)");
  CHECK(parse_error("PK\x03\x04 a zip, an .npz") == "not a .npy file (bad magic string)");
  CHECK(parse_error("\x92NUMPY" + good.substr(6)) == "not a .npy file (bad magic string)");
  CHECK(parse_error(npy_file(3, 0, padded(f4_2x3), data)) ==
        "unsupported .npy format version 3.0 (expected 1.0 or 2.0)");
  CHECK(parse_error(npy_file(1, 1, padded(f4_2x3), data)).find("version 1.1") != std::string::npos);
  CHECK(parse_error(npy_file(0, 0, padded(f4_2x3), data)).find("version 0.0") != std::string::npos);
  CHECK(parse_error(good.substr(0, 9)).find("truncated header") != std::string::npos);
  CHECK(parse_error(good.substr(0, 40)).find("truncated header") != std::string::npos);
  CHECK(parse_error(good.substr(0, good.size() - 1)) ==
        "truncated data: shape (2, 3) of '<f4' needs 24 bytes, the file has 23");
  CHECK(parse_error(good + "x") == "1 unexpected bytes after the data of shape (2, 3)");

  CHECK(with_dict("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", data) ==
        "fortran_order True is not supported (save a C-order array)");
  CHECK(with_dict("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }", data).find("big-endian") !=
        std::string::npos);
  for (const char* d : {"<f2", "<i8", "<u4", "|b1", "<c8", "|O", "<U3", "f4", "=f4"}) {
    CAPTURE(d);
    CHECK(with_dict(std::string("{'descr': '") + d + "', 'fortran_order': False, 'shape': (2, 3), }", data)
              .find("unsupported dtype") != std::string::npos);
  }
  CHECK(with_dict("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2, 3), }", data)
            .find("unsupported dtype") != std::string::npos);

  // Header syntax.
  for (const char* dict : {
           "",                                                                           // empty
           "['descr', '<f4']",                                                           // not a dict
           "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), ",                 // unclosed
           "{'descr': '<f4' 'fortran_order': False, 'shape': (2, 3)}",                   // missing comma
           "{'descr': '<f4', 'fortran_order': false, 'shape': (2, 3)}",                  // not Python's False
           "{'descr': '<f4', 'fortran_order': False, 'shape': [2, 3]}",                  // list, not tuple
           "{'descr': '<f4', 'fortran_order': False, 'shape': (2, -3)}",                 // negative dimension
           "{'descr': '<f4', 'fortran_order': False, 'shape': (2.0, 3)}",                // float dimension
           "{'descr': '<f4', 'fortran_order': False, 'shape': (2 3)}",                   // missing comma in tuple
           "{'descr': '<f4', 'fortran_order': False, 'shape': (6)}",                     // (6) is not a tuple
           "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'extra': 1}",      // unknown key
           "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}",  // duplicate key
           "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)} trailing",
           "{descr: '<f4', 'fortran_order': False, 'shape': (2, 3)}",                          // unquoted key
           "{'descr: '<f4', 'fortran_order': False, 'shape': (2, 3)}",                         // broken quote
           "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999, 3)}",  // overflow
       }) {
    CAPTURE(dict);
    CHECK(with_dict(dict, data).find("malformed header") != std::string::npos);
  }
  CHECK(with_dict("{'descr': '<f4', 'fortran_order': False}") == "malformed header: missing key 'shape'");
  CHECK(with_dict("{'fortran_order': False, 'shape': (2, 3)}", data) == "malformed header: missing key 'descr'");
  CHECK(with_dict("{'descr': '<f4', 'shape': (2, 3)}", data) == "malformed header: missing key 'fortran_order'");
  CHECK(with_dict("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)\x01}", data)
            .find("non-ASCII or control byte") != std::string::npos);
  CHECK(with_dict("{'descr': '<f4', 'fortran_order': False, 'shape': (\xc3\xa9, 3)}", data).find("non-ASCII") !=
        std::string::npos);
  // A shape whose byte count overflows size_t is rejected before anything is allocated.
  CHECK(with_dict("{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296)}") == "shape too large");
  CHECK(
      with_dict("{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000, 1000000000)}").find("truncated data") !=
      std::string::npos);
}

TEST_CASE("npy: the writer header (format 1.0), byte for byte") {
  const std::vector<float> v{1.0f, 2.0f, -1.5f, 0.5f, 0.0f, -2.0f};
  const std::vector<std::size_t> shape{2, 3};
  const std::string f = npy::encode<float>(v, shape);
  const std::string header = padded(f4_2x3);
  REQUIRE(header.size() == 118);  // 10 + 59 + '\n' = 70 bytes, padded to 128
  CHECK(f == npy_file(1, 0, header, raw(v)));
}

TEST_CASE("npy: writer alignment and round trips") {
  const std::vector<std::vector<std::size_t>> shapes = {
      {}, {0}, {1}, {7}, {0, 5}, {3, 4}, {12345678, 0}, {1, 1, 1}, {1000000000, 0, 3}};
  for (const auto& shape : shapes) {
    CAPTURE(npy::shape_string(shape));
    std::size_t n = 1;
    for (std::size_t d : shape) n *= d;
    std::vector<std::int32_t> iv(n);
    for (std::size_t i = 0; i < n; ++i) iv[i] = static_cast<std::int32_t>(i * 2654435761u) - 17;
    const std::string f = npy::encode<std::int32_t>(iv, shape);
    CHECK(static_cast<unsigned char>(f[6]) == 1);
    CHECK(f[7] == 0);
    const std::size_t header_len =
        static_cast<unsigned char>(f[8]) | (static_cast<std::size_t>(static_cast<unsigned char>(f[9])) << 8);
    CHECK((header_len + 10) % 64 == 0);
    CHECK(f[10 + header_len - 1] == '\n');
    CHECK(f.size() == 10 + header_len + 4 * n);
    const npy::array a = npy::parse(f);
    CHECK(a.type == npy::dtype::int32);
    CHECK(a.shape == shape);
    CHECK(a.values<std::int32_t>() == iv);
  }
  const std::vector<std::uint8_t> u{0, 1, 1, 0, 255, 3};
  const std::vector<std::size_t> s23{2, 3};
  const npy::array au = npy::parse(npy::encode<std::uint8_t>(u, s23));
  CHECK(au.type == npy::dtype::uint8);
  CHECK(au.values<std::uint8_t>() == u);
  CHECK(npy::encode<std::uint8_t>(u, s23).find("'descr': '|u1'") != std::string::npos);
  const std::vector<float> fv{0.1f, -0.0f, 3.4e38f, 1e-45f, 1.0f, -7.25f};
  CHECK(npy::parse(npy::encode<float>(fv, s23)).values<float>() == fv);
  const std::vector<double> dv{0.1, -2.5};
  const std::vector<std::size_t> s2{2};
  CHECK(npy::parse(npy::encode<double>(dv, s2)).values<double>() == dv);
  CHECK_THROWS_AS((void)npy::encode<double>(dv, s23), npy::error);  // shape and values disagree
}

TEST_CASE("npy: files") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(RESONANCE_TEST_TMPDIR) / "npy";
  fs::create_directories(dir);
  const std::string path = (dir / "m.npy").string();
  const std::vector<float> v{1, 2, 3, 4};
  const std::vector<std::size_t> shape{2, 2};
  npy::save<float>(path, v, shape);
  const npy::array a = npy::load(path);
  CHECK(a.shape == shape);
  CHECK(a.values<float>() == v);
  CHECK_THROWS_WITH_AS(npy::load((dir / "missing.npy").string()), "cannot open: No such file or directory", npy::error);
  CHECK_THROWS_AS(npy::load(dir.string()), npy::error);  // a directory is not a file
  CHECK_THROWS_AS(npy::save<float>((dir / "no" / "such" / "dir.npy").string(), v, shape), npy::error);
}

namespace {

// The message of the npy::error that f() throws; "" when it does not throw.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const npy::error& e) {
    return e.what();
  }
  return "";
}

void write_bytes(const std::filesystem::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary) << bytes;
}

}  // namespace

TEST_CASE("npy: load compares the declared size with the file size before it allocates") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(RESONANCE_TEST_TMPDIR) / "npy_size";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const auto load_error = [&](const std::string& name, const std::string& bytes) {
    write_bytes(dir / name, bytes);
    return error_of([&] { (void)npy::load((dir / name).string()); });
  };
  // 10^6 x 10^6 float32 (4 TB) declared, a 100-byte body: rejected from the header and the file size.
  CHECK(load_error("huge.npy", npy_file(1, 0,
                                        padded("{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, "
                                               "1000000), }"),
                                        std::string(100, '\0'))) ==
        "truncated data: shape (1000000, 1000000) of '<f4' needs 4000000000000 bytes, the file has 100");
  // A shape whose byte count overflows size_t.
  CHECK(load_error("overflow.npy",
                   npy_file(1, 0, padded("{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296)}"),
                            std::string(64, '\0'))) == "shape too large");
  CHECK(load_error("overflow3.npy", npy_file(1, 0,
                                             padded("{'descr': '<u1', 'fortran_order': False, 'shape': (65536, "
                                                    "65536, 65536, 65536, 65536)}"),
                                             "")) == "shape too large");
  // A format 2.0 header length of 4 GiB in a small file.
  CHECK(load_error("header.npy", "\x93NUMPY" + bytes({2, 0, 0xff, 0xff, 0xff, 0xff}) + "{}")
            .find("truncated header (4294967295 header bytes announced, 2 present)") != std::string::npos);
  CHECK(load_error("short.npy", "\x93NUMPY" + bytes({1, 0, 0x40})) ==
        "truncated header (file ends inside the header length)");
  CHECK(load_error("empty.npy", "") == "not a .npy file (bad magic string)");
  // A header of 0 or 1 bytes ends inside the 12 bytes load() reads first: the same error as parse().
  for (const std::string& b : {"\x93NUMPY" + bytes({1, 0, 0, 0}) + "a", "\x93NUMPY" + bytes({1, 0, 1, 0}) + "{}"}) {
    const std::string want = error_of([&] { (void)npy::parse(b); });
    CHECK_FALSE(want.empty());
    CHECK(load_error("tiny_header.npy", b) == want);
  }
  CHECK(load_error("extra.npy", npy_file(1, 0, padded(f4_2x3), raw(std::vector<float>(7, 1.0f)))) ==
        "4 unexpected bytes after the data of shape (2, 3)");
  // load and parse agree on a good file.
  const std::string good = npy_file(1, 0, padded(f4_2x3), raw(std::vector<float>{1, 2, 3, 4, 5, 6}));
  CHECK(load_error("good.npy", good).empty());
  CHECK(npy::load((dir / "good.npy").string()).values<float>() == npy::parse(good).values<float>());
  CHECK(npy::read_file((dir / "good.npy").string()) == good);
}

TEST_CASE("npy: only regular files are read, without blocking on a FIFO") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(RESONANCE_TEST_TMPDIR) / "npy_kind";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const auto load_error = [](const fs::path& p) { return error_of([&] { (void)npy::load(p.string()); }); };
  const auto read_error = [](const fs::path& p) { return error_of([&] { (void)npy::read_file(p.string()); }); };
  CHECK(load_error(dir) == "not a regular file: it is a directory");
  CHECK(read_error(dir) == "not a regular file: it is a directory");
  if (fs::exists("/dev/zero")) {  // an endless stream
    CHECK(load_error("/dev/zero") == "not a regular file: it is a character device");
    CHECK(read_error("/dev/zero") == "not a regular file: it is a character device");
  }
  const fs::path fifo = dir / "fifo";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);  // no writer: a blocking open would hang here
  CHECK(load_error(fifo) == "not a regular file: it is a FIFO (named pipe)");
  CHECK(read_error(fifo) == "not a regular file: it is a FIFO (named pipe)");
}

TEST_CASE("npy: write_file reports a write that fails") {
  namespace fs = std::filesystem;
  if (!fs::exists("/dev/full")) return;  // every write fails with ENOSPC there
  const std::string msg = error_of([] { npy::write_file("/dev/full", std::string(100000, 'x')); });
  CHECK(msg.rfind("cannot write '/dev/full': ", 0) == 0);
  CHECK(msg.find(std::strerror(ENOSPC)) != std::string::npos);
  CHECK(fs::exists("/dev/full"));  // a device is never unlinked
}
