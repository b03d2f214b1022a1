// safetensors, JSON, dtypes and config.json: malformed files are rejected with messages that name the file, tensor
// or key and what is wrong; the writer round-trips (byte for byte against a file the Rust library wrote); sharded
// folders resolve through their index; the reference configs parse in both the transformers-5 and the Hub form.
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>

#include "harness.h"
#include "io/dtype.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "util/error.h"
#include "util/json.h"

using namespace qlora;
namespace fs = std::filesystem;

namespace {

using qtest::read_bytes;
using qtest::TempDir;

void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

std::string le64(uint64_t n) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out;
}

// A safetensors file from a header text and a data section.
std::string st_file(const std::string& header, const std::string& data) { return le64(header.size()) + header + data; }

uint64_t header_length(const std::string& bytes) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  return n;
}

// The fields every config below shares; each case adds or overrides keys (a repeated key: the last one wins).
const std::string kBaseConfig =
    R"("vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, )"
    R"("num_attention_heads": 2)";

ModelConfig parse_cfg(const std::string& extra) { return parse_model_config("{" + kBaseConfig + extra + "}", "cfg.json"); }

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// safetensors reader

TEST(io_safetensors_malformed_files_are_rejected_naming_file_and_problem) {
  const TempDir dir("malformed");
  const std::string file = dir.file("bad.safetensors");
  const std::string eight(8, 'x');
  const std::string w2 = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  struct Case {
    std::string bytes;
    std::string fragment;
  };
  const Case cases[] = {
      {"", "too short to be a safetensors file (0 bytes"},
      {"abc", "too short to be a safetensors file (3 bytes"},
      {le64(65535) + "{}", "header length 65535 is larger than the rest of the file (2 bytes)"},
      {le64(uint64_t{1} << 62) + "{}", "is larger than the rest of the file"},
      {le64(0), "invalid JSON at byte 0: unexpected end of input"},
      {st_file("{\"a\": ", ""), "invalid JSON"},
      {st_file("{\"a\": 1", ""), "(header): invalid JSON at byte 7: unterminated object"},
      {st_file("[1, 2]", ""), "header is not a JSON object"},
      {st_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", std::string(4, 'x')),
       "tensor 'w' data_offsets [0, 8] extend past the end of the data (4 bytes)"},
      {st_file(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", eight),
       "tensor 'w' holds 8 bytes but F32 [3] needs 12"},
      {st_file(R"({"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,8]}})", eight),
       "tensor 'w' holds 8 bytes but BF16 [2, 3] needs 12"},
      {st_file(R"({"w":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}})", eight), "tensor 'w': dtype 'Q9' is not supported"},
      {st_file(R"({"w":{"dtype":7,"shape":[2],"data_offsets":[0,8]}})", eight), "tensor 'w' dtype: expected a string"},
      {st_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", eight),
       "tensor 'w' has data_offsets [8, 0] (need 0 <= begin <= end)"},
      {st_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[-4,4]}})", eight), "need 0 <= begin <= end"},
      {st_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", eight), "data_offsets must be [begin, end]"},
      {st_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8.5]}})", eight),
       "tensor 'w' data_offsets: expected an integer, got 8.5"},
      {st_file(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", eight), "negative dimension (-2)"},
      {st_file(R"({"w":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", eight),
       "tensor 'w' shape: expected an integer, got 2.5"},
      {st_file(R"({"w":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", eight),
       "tensor 'w' shape: expected an array, got a number"},
      {st_file(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,8]}})", eight),
       "whose size overflows"},
      {st_file(R"({"w":{"shape":[2],"data_offsets":[0,8]}})", eight), "tensor 'w' has no dtype"},
      {st_file(R"({"w":{"dtype":"F32","data_offsets":[0,8]}})", eight), "tensor 'w' has no shape"},
      {st_file(R"({"w":{"dtype":"F32","shape":[2]}})", eight), "tensor 'w' has no data_offsets"},
      {st_file(R"({"w":[1,2]})", eight), "tensor 'w' is not a {dtype, shape, data_offsets} object"},
      {st_file(R"({"__metadata__":[1],"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", eight),
       "__metadata__ is not an object"},
      {st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
               R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
               eight),
       "tensors 'a' and 'b' overlap (data bytes [0, 8) and [4, 8))"},
      {st_file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
               R"("w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
               eight),
       "tensor 'w' appears twice in the header"},
  };
  for (const Case& c : cases) {
    write_bytes(file, c.bytes);
    EXPECT_THROWS_WITH(SafetensorsFile::open(file), file);
    EXPECT_THROWS_WITH(SafetensorsFile::open(file), c.fragment);
  }
  EXPECT_THROWS_WITH(SafetensorsFile::open(dir.file("missing.safetensors")), "missing.safetensors: cannot open");
  EXPECT_THROWS_WITH(SafetensorsFile::open(dir.path.string()), "is not a regular file");
}

TEST(io_safetensors_accepts_empty_files_zero_size_tensors_and_gaps) {
  const TempDir dir("lenient");
  const std::string file = dir.file("ok.safetensors");
  write_bytes(file, st_file("{}", ""));
  EXPECT_EQ(SafetensorsFile::open(file)->tensors().size(), 0u);
  write_bytes(file, st_file(R"({"__metadata__":null})", ""));
  EXPECT_EQ(SafetensorsFile::open(file)->metadata().size(), 0u);

  // Zero-size tensors may share offsets with each other and with real data; entries come back in file order.
  const float values[3] = {1.5f, -2.0f, 0.25f};
  std::string data(12, '\0');
  std::memcpy(data.data(), values, 12);
  write_bytes(file, st_file(R"({"z":{"dtype":"F32","shape":[0,5],"data_offsets":[4,4]},)"
                            R"("c":{"dtype":"F32","shape":[],"data_offsets":[8,12]},)"
                            R"("b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                            R"("e":{"dtype":"I8","shape":[0],"data_offsets":[4,4]}})",
                            data));
  const auto f = SafetensorsFile::open(file);
  EXPECT_EQ(f->tensors().size(), 4u);
  EXPECT_EQ(f->tensors()[0].name, std::string("b"));
  EXPECT_EQ(f->tensors()[1].name, std::string("e"));  // zero-size ties are ordered by name
  EXPECT_EQ(f->tensors()[2].name, std::string("z"));
  EXPECT_EQ(f->tensors()[3].name, std::string("c"));
  EXPECT_EQ(f->find("z")->numel(), 0);
  EXPECT_EQ(f->find("c")->numel(), 1);  // a scalar: shape []
  EXPECT_EQ(f->find("c")->data_begin, static_cast<size_t>(8 + header_length(read_bytes(file)) + 8));
  EXPECT_TRUE(f->find("nope") == nullptr);
  float c;
  std::memcpy(&c, f->data(*f->find("c")), 4);
  EXPECT_EQ(c, 0.25f);

  // A gap between tensors is unusual but harmless; the Python library reads such files too.
  write_bytes(file, st_file(R"({"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})", data));
  const auto gap = SafetensorsFile::open(file);
  float b;
  std::memcpy(&b, gap->data(*gap->find("b")), 4);
  EXPECT_EQ(b, 0.25f);
}

// ---------------------------------------------------------------------------------------------------------------
// safetensors writer

TEST(io_writer_round_trips_bytes_with_a_padded_header) {
  const TempDir dir("writer");
  const std::string file = dir.file("out.safetensors");
  SafetensorsWriter w;
  w.set_metadata("format", "pt");
  w.set_metadata("note", "quote \" and \\ and \xc3\xa9");
  const std::vector<float> a = {1.0f, -2.5f, 3.25f};
  const uint16_t b[2] = {0x3F80, 0xC000};
  const int64_t ids[2] = {-7, int64_t{1} << 40};
  const uint8_t flags[3] = {1, 0, 1};
  w.add_f32("a", {3}, a);
  w.add("b.weight", DType::BF16, {1, 2}, b, sizeof(b));
  w.add("empty", DType::F32, {0, 4}, nullptr, 0);
  w.add("ids", DType::I64, {2}, ids, sizeof(ids));
  w.add("flags", DType::BOOL, {3}, flags, sizeof(flags));
  EXPECT_THROWS_WITH(w.add("a", DType::F32, {1}, a.data(), 4), "tensor 'a' added twice");
  EXPECT_THROWS_WITH(w.add("c", DType::F32, {2}, a.data(), 4), "tensor 'c' has 4 bytes for F32 [2] (needs 8)");
  EXPECT_THROWS_WITH(w.add("d", DType::F32, {-1}, a.data(), 4), "tensor 'd' has an invalid shape [-1]");
  EXPECT_THROWS_WITH(w.add("__metadata__", DType::F32, {1}, a.data(), 4), "'__metadata__' is reserved");
  write_bytes(file, "old contents");  // replaced atomically
  w.write(file);
  for (const auto& entry : fs::directory_iterator(dir.path))
    EXPECT_TRUE(entry.path().filename().string().find(".tmp-") == std::string::npos, "temp file left behind");

  const std::string bytes = read_bytes(file);
  const uint64_t n = header_length(bytes);
  EXPECT_EQ(n % 8, 0u);
  const std::string header = bytes.substr(8, n);
  EXPECT_EQ(header.rfind("{\"__metadata__\":{", 0), 0u);  // metadata first
  EXPECT_TRUE(header.find_last_not_of(' ') < header.size(), "header is all padding");
  EXPECT_EQ(header[header.find_last_not_of(' ')], '}');
  // Offsets contiguous in the order added: 12 + 4 + 0 + 16 + 3 bytes of data.
  EXPECT_EQ(bytes.size(), static_cast<size_t>(8 + n + 35));
  EXPECT_TRUE(header.find(R"("ids":{"dtype":"I64","shape":[2],"data_offsets":[16,32]})") != std::string::npos, header);

  const auto f = SafetensorsFile::open(file);
  EXPECT_EQ(f->metadata().at("format"), std::string("pt"));
  EXPECT_EQ(f->metadata().at("note"), std::string("quote \" and \\ and \xc3\xa9"));
  EXPECT_EQ(f->tensors().size(), 5u);
  EXPECT_EQ(std::memcmp(f->data(*f->find("a")), a.data(), 12), 0);
  EXPECT_EQ(std::memcmp(f->data(*f->find("b.weight")), b, 4), 0);
  EXPECT_EQ(std::memcmp(f->data(*f->find("ids")), ids, 16), 0);
  EXPECT_EQ(std::memcmp(f->data(*f->find("flags")), flags, 3), 0);
  EXPECT_TRUE(f->find("flags")->dtype == DType::BOOL);
  EXPECT_EQ(shape_to_string(f->find("empty")->shape), std::string("[0, 4]"));

  const auto store = TensorStore::open_file(file);
  const std::vector<float> bf = store->read_f32("b.weight", {1, 2});
  EXPECT_EQ(bf[0], 1.0f);
  EXPECT_EQ(bf[1], -2.0f);
  EXPECT_EQ(store->read_f32("empty").size(), 0u);
  EXPECT_THROWS_WITH(store->read_f32("b.weight", {2, 1}), file + ": tensor 'b.weight' has shape [1, 2], expected [2, 1]");
  EXPECT_THROWS_WITH(store->read_f32("ids"), "tensor 'ids' is I64, not a floating type");
  EXPECT_THROWS_WITH(store->info("nope"), file + ": tensor 'nope' not found");
  EXPECT_TRUE(store->names() == (std::vector<std::string>{"a", "b.weight", "empty", "flags", "ids"}));

  // A failed write names the path and leaves nothing behind.
  const std::string unwritable = (dir.path / "no-such-folder" / "x.safetensors").string();
  EXPECT_THROWS_WITH(w.write(unwritable), unwritable + ": cannot write");
  EXPECT_THROWS_WITH(SafetensorsWriter().write(dir.path.string() + "/"), "not a file path");
}

TEST(io_writer_deferred_tensors_write_the_same_file_one_at_a_time) {
  // Tensors whose bytes are produced when the writer reaches them (merge: one merged weight in memory at a time)
  // give the file that adding their bytes up front gives; a producer that hands over too few or too many bytes, or
  // throws, fails the write naming the tensor and leaves no file.
  const TempDir dir("writer-deferred");
  const std::vector<float> a = {1.0f, -2.5f, 3.25f, 0.5f};
  const uint16_t b[3] = {0x3F80, 0xC000, 0x0001};
  SafetensorsWriter added, deferred;
  for (SafetensorsWriter* w : {&added, &deferred}) w->set_metadata("format", "pt");
  added.add_f32("a", {2, 2}, a);
  added.add("b", DType::BF16, {3}, b, sizeof(b));
  added.add("empty", DType::F32, {0}, nullptr, 0);
  std::vector<std::string> order;
  deferred.add_deferred("a", DType::F32, {2, 2}, [&](const SafetensorsWriter::ByteSink& sink) {
    order.push_back("a");
    sink(a.data(), 8);  // in two pieces
    sink(a.data() + 2, 8);
  });
  deferred.add("b", DType::BF16, {3}, b, sizeof(b));
  deferred.add_deferred("empty", DType::F32, {0}, [&](const SafetensorsWriter::ByteSink&) { order.push_back("empty"); });
  EXPECT_TRUE(order.empty(), "a producer ran before the write");
  added.write(dir.file("added.safetensors"));
  deferred.write(dir.file("deferred.safetensors"));
  EXPECT_TRUE(order == (std::vector<std::string>{"a", "empty"}));
  EXPECT_TRUE(read_bytes(dir.file("added.safetensors")) == read_bytes(dir.file("deferred.safetensors")));
  EXPECT_THROWS_WITH(deferred.add_deferred("a", DType::F32, {1}, nullptr), "tensor 'a' added twice");

  const std::string bad = dir.file("bad.safetensors");
  SafetensorsWriter short_one, long_one, throwing;
  short_one.add_deferred("w", DType::F32, {2}, [&](const SafetensorsWriter::ByteSink& sink) { sink(a.data(), 4); });
  EXPECT_THROWS_WITH(short_one.write(bad), bad + ": tensor 'w' was given 4 of its 8 bytes");
  long_one.add_deferred("w", DType::F32, {2}, [&](const SafetensorsWriter::ByteSink& sink) { sink(a.data(), 12); });
  EXPECT_THROWS_WITH(long_one.write(bad), bad + ": tensor 'w' was given more than its 8 bytes");
  throwing.add_deferred("w", DType::F32, {2}, [](const SafetensorsWriter::ByteSink&) { fail("a corrupt weight"); });
  EXPECT_THROWS_WITH(throwing.write(bad), "a corrupt weight");
  EXPECT_TRUE(!fs::exists(bad), "a failed write left its file");
  for (const auto& entry : fs::directory_iterator(dir.path))
    EXPECT_TRUE(entry.path().filename().string().find(".tmp-") == std::string::npos, "temp file left behind");
}

TEST(io_writer_reproduces_a_reference_file_byte_for_byte) {
  // The reference checkpoint was written by the Rust safetensors library (via transformers): compact JSON,
  // __metadata__ first, space padding to 8 bytes. Writing its tensors back in file order must give the same bytes.
  const std::string source = qtest::reference("llama-shared/model.safetensors");
  const auto f = SafetensorsFile::open(source);
  EXPECT_EQ(f->tensors().size(), 21u);
  SafetensorsWriter w;
  for (const auto& [k, v] : f->metadata()) w.set_metadata(k, v);
  for (const TensorInfo& t : f->tensors()) w.add(t.name, t.dtype, t.shape, f->data(t), t.nbytes);
  const TempDir dir("rewrite");
  const std::string out = dir.file("model.safetensors");
  w.write(out);
  const std::string expected = read_bytes(source), actual = read_bytes(out);
  EXPECT_EQ(actual.size(), expected.size());
  EXPECT_TRUE(actual == expected, "rewritten file differs from the reference");
}

TEST(io_atomic_text_files_round_trip_and_report_failures) {
  const TempDir dir("text");
  const std::string file = dir.file("notes.json");
  write_file_atomic(file, "first");
  write_file_atomic(file, std::string("second\n\0binary", 14));
  EXPECT_EQ(read_text_file(file), std::string("second\n\0binary", 14));
  write_file_atomic(file, "");
  EXPECT_EQ(read_text_file(file), std::string());
  EXPECT_EQ(std::distance(fs::directory_iterator(dir.path), fs::directory_iterator()), 1);
  EXPECT_THROWS_WITH(read_text_file(dir.file("missing.json")), "missing.json: cannot read (");
  EXPECT_THROWS_WITH(read_text_file(dir.path.string()), ": cannot read (it is a folder)");
  EXPECT_THROWS_WITH(write_file_atomic(dir.file("nope/x.json"), "x"), "x.json: cannot write");
}

// ---------------------------------------------------------------------------------------------------------------
// Model folders

TEST(io_sharded_store_resolves_through_the_index) {
  const TempDir dir("sharded");
  const std::string shard1 = "model-00001-of-00002.safetensors", shard2 = "model-00002-of-00002.safetensors";
  SafetensorsWriter s1, s2;
  s1.add_f32("x", {2}, {1.0f, 2.0f});
  const uint16_t half[2] = {0x3C00, 0xC000};  // f16 1.0, -2.0
  s1.add("h", DType::F16, {2}, half, sizeof(half));
  const double wide[1] = {0.5};
  s2.add("y", DType::F64, {1, 1}, wide, sizeof(wide));
  s2.add_f32("unlisted", {1}, {9.0f});  // in a shard but not in the index: ignored, as transformers does
  s1.write(dir.file(shard1));
  s2.write(dir.file(shard2));
  const std::string index = dir.file("model.safetensors.index.json");
  write_file_atomic(index, R"({"metadata":{"total_size":20},"weight_map":{"x":")" + shard1 + R"(","h":")" + shard1 +
                               R"(","y":")" + shard2 + R"("}})");
  const auto store = TensorStore::open_dir(dir.path.string());
  EXPECT_EQ(store->location(), dir.path.string());
  EXPECT_TRUE(store->names() == (std::vector<std::string>{"h", "x", "y"}));
  EXPECT_TRUE(!store->has("unlisted"));
  EXPECT_EQ(store->read_f32("y", {1, 1})[0], 0.5f);
  EXPECT_EQ(store->read_f32("h")[1], -2.0f);
  EXPECT_EQ(store->read_f32("x")[1], 2.0f);
  EXPECT_EQ(store->file_of("y"), dir.file(shard2));
  EXPECT_EQ(store->file_of("x"), dir.file(shard1));
  EXPECT_EQ(store->info("h").nbytes, 4u);
  EXPECT_THROWS_WITH(store->read_f32("y", {1}), dir.file(shard2) + ": tensor 'y' has shape [1, 1], expected [1]");

  // The index wins over a model.safetensors beside it.
  SafetensorsWriter single;
  single.add_f32("only", {1}, {1.0f});
  single.write(dir.file("model.safetensors"));
  EXPECT_TRUE(!TensorStore::open_dir(dir.path.string())->has("only"));

  write_file_atomic(index, R"({"weight_map":{"z":")" + shard1 + R"("}})");
  EXPECT_THROWS_WITH(TensorStore::open_dir(dir.path.string()),
                     index + ": tensor 'z' is listed in shard '" + shard1 + "' but " + dir.file(shard1) +
                         " does not contain it");
  write_file_atomic(index, R"({"weight_map":{"x":"model-00003-of-00003.safetensors"}})");
  EXPECT_THROWS_WITH(TensorStore::open_dir(dir.path.string()),
                     "shard 'model-00003-of-00003.safetensors' listed for 'x' does not exist");
  write_file_atomic(index, R"({"weight_map":{"x":"../elsewhere.safetensors"}})");
  EXPECT_THROWS_WITH(TensorStore::open_dir(dir.path.string()), "shard '../elsewhere.safetensors' is outside the model folder");
  write_file_atomic(index, R"({"weight_map":{"x":"/etc/passwd"}})");
  EXPECT_THROWS_WITH(TensorStore::open_dir(dir.path.string()), "is outside the model folder");
  write_file_atomic(index, R"({"metadata":{}})");
  EXPECT_THROWS_WITH(TensorStore::open_dir(dir.path.string()), index + ": no weight_map");
  write_file_atomic(index, R"({"weight_map":{"x":3}})");
  EXPECT_THROWS_WITH(TensorStore::open_dir(dir.path.string()), "weight_map['x']: expected a string, got a number");
  write_file_atomic(index, R"({"weight_map":)");
  EXPECT_THROWS_WITH(TensorStore::open_dir(dir.path.string()), index + ": invalid JSON at byte 14: unexpected end of input");

  // A broken shard is reported by its own path.
  write_file_atomic(index, R"({"weight_map":{"x":")" + shard1 + R"("}})");
  write_bytes(dir.file(shard1), "short");
  EXPECT_THROWS_WITH(TensorStore::open_dir(dir.path.string()), dir.file(shard1) + ": too short");

  const TempDir empty("empty");
  EXPECT_THROWS_WITH(TensorStore::open_dir(empty.path.string()),
                     empty.path.string() + ": no model.safetensors or model.safetensors.index.json");
  EXPECT_THROWS_WITH(TensorStore::open_dir(empty.file("missing")), "missing: not a folder");
}

TEST(io_reference_model_tensors_read_as_f32) {
  const auto store = TensorStore::open_dir(qtest::reference("llama-shared"));
  EXPECT_EQ(store->names().size(), 21u);
  const TensorInfo& embed = store->info("model.embed_tokens.weight");
  EXPECT_TRUE(embed.dtype == DType::BF16);
  EXPECT_EQ(shape_to_string(embed.shape), std::string("[256, 128]"));
  EXPECT_EQ(embed.nbytes, 256u * 128u * 2u);
  const std::vector<float> values = store->read_f32("model.embed_tokens.weight", {256, 128});
  const uint8_t* raw = store->data("model.embed_tokens.weight");
  for (size_t i = 0; i < values.size(); i += 97) {
    uint16_t h;
    std::memcpy(&h, raw + 2 * i, 2);
    EXPECT_EQ(values[i], bf16_to_f32(h));
  }
  EXPECT_TRUE(store->file_of("lm_head.weight").find("llama-shared/model.safetensors") != std::string::npos);
  EXPECT_THROWS_WITH(store->read_f32("model.embed_tokens.weight", {128, 256}),
                     "tensor 'model.embed_tokens.weight' has shape [256, 128], expected [128, 256]");
}

// ---------------------------------------------------------------------------------------------------------------
// config.json

TEST(io_reference_configs_parse_in_both_forms) {
  // transformers 5: rope_parameters, dtype, explicit head_dim.
  const ModelConfig llama = load_model_config(qtest::reference("llama-shared"));
  EXPECT_EQ(llama.architecture, std::string("LlamaForCausalLM"));
  EXPECT_EQ(llama.model_type, std::string("llama"));
  EXPECT_EQ(llama.vocab_size, 256);
  EXPECT_EQ(llama.hidden_size, 128);
  EXPECT_EQ(llama.intermediate_size, 256);
  EXPECT_EQ(llama.num_layers, 2);
  EXPECT_EQ(llama.num_heads, 8);
  EXPECT_EQ(llama.num_kv_heads, 4);
  EXPECT_EQ(llama.head_dim, 16);
  EXPECT_EQ(llama.rms_norm_eps, 1e-6);
  EXPECT_EQ(llama.rope_theta, 10000.0);
  EXPECT_TRUE(llama.rope_scaling.kind == RopeScaling::Kind::None);
  EXPECT_EQ(llama.max_position_embeddings, 512);
  EXPECT_TRUE(!llama.tie_word_embeddings && !llama.qkv_bias && !llama.o_bias && !llama.mlp_bias);
  EXPECT_EQ(llama.sliding_window, 0);
  EXPECT_TRUE(llama.bos_token_id && *llama.bos_token_id == 1);
  EXPECT_TRUE(llama.eos_token_ids == std::vector<int64_t>{2});
  EXPECT_EQ(llama.dtype, std::string("bfloat16"));
  EXPECT_TRUE(!llama.quantization);

  // Hub form: top-level rope_theta, rope_scaling with llama3 parameters, torch_dtype, tied embeddings.
  const ModelConfig l3 = load_model_config(qtest::reference("llama3-shared"));
  EXPECT_EQ(l3.hidden_size, 96);
  EXPECT_EQ(l3.num_heads, 6);
  EXPECT_EQ(l3.num_kv_heads, 2);
  EXPECT_EQ(l3.head_dim, 16);
  EXPECT_EQ(l3.intermediate_size, 150);
  EXPECT_EQ(l3.rms_norm_eps, 1e-5);
  EXPECT_EQ(l3.rope_theta, 500000.0);
  EXPECT_TRUE(l3.rope_scaling.kind == RopeScaling::Kind::Llama3);
  EXPECT_EQ(l3.rope_scaling.factor, 8.0);
  EXPECT_EQ(l3.rope_scaling.low_freq_factor, 1.0);
  EXPECT_EQ(l3.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(l3.rope_scaling.original_max_position_embeddings, 16);
  EXPECT_EQ(l3.max_position_embeddings, 2048);
  EXPECT_TRUE(l3.tie_word_embeddings);
  EXPECT_EQ(l3.dtype, std::string("bfloat16"));

  // Qwen2 without head_dim: hidden_size / num_attention_heads; q/k/v biases but no o_proj bias.
  const ModelConfig qwen = load_model_config(qtest::reference("qwen2-shared"));
  EXPECT_EQ(qwen.architecture, std::string("Qwen2ForCausalLM"));
  EXPECT_EQ(qwen.model_type, std::string("qwen2"));
  EXPECT_EQ(qwen.head_dim, 16);
  EXPECT_EQ(qwen.num_kv_heads, 1);
  EXPECT_EQ(qwen.rope_theta, 1000000.0);
  EXPECT_TRUE(qwen.qkv_bias && !qwen.o_bias && !qwen.mlp_bias);
  EXPECT_TRUE(qwen.tie_word_embeddings);
  EXPECT_EQ(qwen.sliding_window, 0);

  // bitsandbytes 4-bit checkpoints, with and without double quantization.
  const ModelConfig dq = load_model_config(qtest::reference("llama-shared-bnb4-dq"));
  EXPECT_TRUE(dq.quantization.has_value());
  EXPECT_TRUE(dq.quantization->load_in_4bit);
  EXPECT_EQ(dq.quantization->quant_type, std::string("nf4"));
  EXPECT_TRUE(dq.quantization->double_quant);
  EXPECT_EQ(dq.quantization->compute_dtype, std::string("float32"));
  EXPECT_EQ(dq.dtype, std::string("float32"));
  const ModelConfig bnb = load_model_config(qtest::reference("llama-shared-bnb4"));
  EXPECT_TRUE(bnb.quantization && bnb.quantization->load_in_4bit && !bnb.quantization->double_quant);
}

TEST(io_config_defaults_and_variants) {
  // No architectures: model_type decides. head_dim null and num_key_value_heads absent fall back.
  const ModelConfig m = parse_cfg(R"(, "model_type": "llama", "head_dim": null, "bos_token_id": null)");
  EXPECT_EQ(m.architecture, std::string("LlamaForCausalLM"));
  EXPECT_EQ(m.head_dim, 4);
  EXPECT_EQ(m.num_kv_heads, 2);
  EXPECT_EQ(m.rope_theta, 10000.0);
  EXPECT_EQ(m.rms_norm_eps, 1e-6);
  EXPECT_TRUE(!m.bos_token_id);
  EXPECT_TRUE(m.eos_token_ids.empty());
  EXPECT_EQ(m.dtype, std::string());
  EXPECT_EQ(parse_cfg(R"(, "model_type": "qwen2")").architecture, std::string("Qwen2ForCausalLM"));
  EXPECT_EQ(parse_cfg(R"(, "architectures": ["MistralForCausalLM"])").model_type, std::string("mistral"));
  // head_dim given explicitly need not divide hidden_size.
  EXPECT_EQ(parse_cfg(R"(, "model_type": "llama", "num_attention_heads": 3, "head_dim": 6)").head_dim, 6);

  const ModelConfig eos = parse_cfg(R"(, "model_type": "llama", "eos_token_id": [128001, 128009], "bos_token_id": 7)");
  EXPECT_TRUE(eos.eos_token_ids == (std::vector<int64_t>{128001, 128009}));
  EXPECT_EQ(*eos.bos_token_id, 7);
  EXPECT_EQ(parse_cfg(R"(, "model_type": "llama", "dtype": "float16", "torch_dtype": "bfloat16")").dtype,
            std::string("float16"));
  EXPECT_EQ(parse_cfg(R"(, "model_type": "llama", "torch_dtype": "bfloat16")").dtype, std::string("bfloat16"));

  const ModelConfig biased = parse_cfg(R"(, "model_type": "llama", "attention_bias": true, "mlp_bias": true)");
  EXPECT_TRUE(biased.qkv_bias && biased.o_bias && biased.mlp_bias);
  const ModelConfig qwen = parse_cfg(R"(, "model_type": "qwen2", "attention_bias": true, "tie_word_embeddings": false)");
  EXPECT_TRUE(qwen.qkv_bias && !qwen.o_bias && !qwen.tie_word_embeddings);

  // Sliding windows: Mistral's counts unless it covers every position; Qwen2's only with use_sliding_window.
  EXPECT_EQ(parse_cfg(R"(, "model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768)")
                .sliding_window,
            4096);
  EXPECT_EQ(parse_cfg(R"(, "model_type": "mistral", "sliding_window": 32768, "max_position_embeddings": 32768)")
                .sliding_window,
            0);
  EXPECT_EQ(parse_cfg(R"(, "model_type": "mistral", "sliding_window": null)").sliding_window, 0);
  // no key: MistralConfig's default of 4096
  EXPECT_EQ(parse_cfg(R"(, "model_type": "mistral", "max_position_embeddings": 32768)").sliding_window, 4096);
  EXPECT_EQ(parse_cfg(R"(, "model_type": "mistral")").sliding_window, 4096);
  EXPECT_EQ(parse_cfg(R"(, "model_type": "llama")").sliding_window, 0);
  EXPECT_EQ(parse_cfg(R"(, "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": false)").sliding_window,
            0);
  EXPECT_EQ(parse_cfg(R"(, "model_type": "qwen2", "sliding_window": 64, "use_sliding_window": true)").sliding_window,
            64);

  // Rope: rope_parameters (transformers 5) over top-level keys; rope_scaling with `type` or `rope_type`.
  const ModelConfig p = parse_cfg(
      R"(, "model_type": "llama", "rope_theta": 1.0, "rope_parameters": {"rope_type": "linear", "factor": 2.0, )"
      R"("rope_theta": 50000.0})");
  EXPECT_TRUE(p.rope_scaling.kind == RopeScaling::Kind::Linear);
  EXPECT_EQ(p.rope_scaling.factor, 2.0);
  EXPECT_EQ(p.rope_theta, 50000.0);
  const ModelConfig p3 = parse_cfg(
      R"(, "model_type": "llama", "rope_parameters": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, )"
      R"("high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_theta": 500000.0})");
  EXPECT_TRUE(p3.rope_scaling.kind == RopeScaling::Kind::Llama3);
  EXPECT_EQ(p3.rope_scaling.factor, 32.0);
  EXPECT_EQ(p3.rope_scaling.original_max_position_embeddings, 8192);
  const ModelConfig linear = parse_cfg(R"(, "model_type": "llama", "rope_scaling": {"type": "linear", "factor": 4})");
  EXPECT_TRUE(linear.rope_scaling.kind == RopeScaling::Kind::Linear);
  EXPECT_EQ(linear.rope_scaling.factor, 4.0);
  EXPECT_TRUE(parse_cfg(R"(, "model_type": "llama", "rope_scaling": null)").rope_scaling.kind ==
              RopeScaling::Kind::None);
  EXPECT_TRUE(parse_cfg(R"(, "model_type": "llama", "rope_scaling": {"rope_type": "default"})").rope_scaling.kind ==
              RopeScaling::Kind::None);
}

TEST(io_bad_configs_name_the_file_and_key) {
  EXPECT_THROWS_WITH(parse_cfg(R"(, "architectures": ["GPT2LMHeadModel"])"),
                     "cfg.json: architecture 'GPT2LMHeadModel' is not supported (supported: LlamaForCausalLM, "
                     "MistralForCausalLM, Qwen2ForCausalLM)");
  EXPECT_THROWS_WITH(parse_cfg(R"(, "model_type": "gpt2")"), "cfg.json: model_type 'gpt2' is not supported");
  EXPECT_THROWS_WITH(parse_cfg(""), "cfg.json: has neither architectures nor model_type");
  EXPECT_THROWS_WITH(parse_cfg(R"(, "model_type": "llama", "num_key_value_heads": 3)"),
                     "cfg.json: num_key_value_heads (3) does not divide num_attention_heads (2)");
  EXPECT_THROWS_WITH(parse_cfg(R"(, "model_type": "llama", "num_attention_heads": 3, "num_key_value_heads": 3)"),
                     "cfg.json: num_attention_heads (3) does not divide hidden_size (8)");
  EXPECT_THROWS_WITH(parse_cfg(R"(, "model_type": "llama", "hidden_size": 0)"), "cfg.json: hidden_size must be positive, got 0");
  EXPECT_THROWS_WITH(parse_cfg(R"(, "model_type": "llama", "num_key_value_heads": -1)"),
                     "cfg.json: num_key_value_heads must be positive, got -1");
  EXPECT_THROWS_WITH(parse_cfg(R"(, "model_type": "llama", "hidden_size": "8")"),
                     "cfg.json: hidden_size: expected a number, got a string");
  EXPECT_THROWS_WITH(parse_cfg(R"(, "model_type": "llama", "hidden_size": 8.5)"),
                     "cfg.json: hidden_size: expected an integer, got 8.5");
  EXPECT_THROWS_WITH(parse_model_config(R"({"model_type": "llama"})", "cfg.json"), "cfg.json: missing 'vocab_size'");
  EXPECT_THROWS_WITH(parse_model_config("[]", "cfg.json"), "cfg.json: is not a JSON object");
  EXPECT_THROWS_WITH(parse_model_config("{\"model_type\": ", "cfg.json"), "cfg.json: invalid JSON at byte 15");
  EXPECT_THROWS_WITH(parse_cfg(R"(, "model_type": "llama", "hidden_act": "gelu")"), "hidden_act 'gelu' is not supported");
  // sizes past every model are refused before anything is sized from them (20 million layers exhausted memory)
  EXPECT_THROWS_WITH(parse_cfg(R"(, "model_type": "llama", "num_hidden_layers": 20000000)"),
                     "cfg.json: num_hidden_layers is 20000000, more than any model this engine loads has (at most 4096)");
  EXPECT_THROWS_WITH(parse_cfg(R"(, "model_type": "llama", "vocab_size": 2147483648)"), "vocab_size is 2147483648, more than");
  EXPECT_THROWS_WITH(parse_cfg(R"(, "model_type": "llama", "head_dim": 1000000)"), "head_dim is 1000000, more than");

  // Rope kinds the engine does not compute are refused rather than approximated.
  EXPECT_THROWS_WITH(parse_cfg(R"(, "model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4})"),
                     "cfg.json: rope scaling type 'yarn' is not supported (supported: default, linear, llama3)");
  EXPECT_THROWS_WITH(parse_cfg(R"(, "model_type": "llama", "rope_scaling": {"type": "dynamic", "factor": 2})"),
                     "rope scaling type 'dynamic' is not supported");
  EXPECT_THROWS_WITH(parse_cfg(R"(, "model_type": "llama", "rope_parameters": {"rope_type": "longrope"})"),
                     "rope scaling type 'longrope' is not supported");
  EXPECT_THROWS_WITH(parse_cfg(R"(, "model_type": "llama", "rope_scaling": {"type": "linear"})"),
                     "cfg.json: rope_scaling.factor is required for rope type 'linear'");
  EXPECT_THROWS_WITH(parse_cfg(R"(, "model_type": "llama", "rope_scaling": {"type": "linear", "factor": "2"})"),
                     "cfg.json: rope_scaling.factor: expected a number, got a string");
  EXPECT_THROWS_WITH(parse_cfg(R"(, "model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8, )"
                               R"("low_freq_factor": 1, "high_freq_factor": 4})"),
                     "rope_scaling.original_max_position_embeddings must be a positive integer");
  EXPECT_THROWS_WITH(parse_cfg(R"(, "model_type": "llama", "rope_scaling": 3)"), "cfg.json: rope_scaling is not an object");
  EXPECT_THROWS_WITH(parse_cfg(R"(, "model_type": "llama", "rope_theta": -1)"), "cfg.json: rope_theta must be positive");

  // Quantized checkpoints: only bitsandbytes 4-bit NF4.
  EXPECT_THROWS_WITH(parse_cfg(R"(, "model_type": "llama", "quantization_config": {"quant_method": "gptq"})"),
                     "cfg.json: quantization method 'gptq' is not supported");
  EXPECT_THROWS_WITH(parse_cfg(R"(, "model_type": "llama", "quantization_config": {"quant_method": "bitsandbytes", )"
                               R"("load_in_8bit": true})"),
                     "cfg.json: 8-bit bitsandbytes checkpoints are not supported");
  EXPECT_THROWS_WITH(parse_cfg(R"(, "model_type": "llama", "quantization_config": {"quant_method": "bitsandbytes", )"
                               R"("load_in_4bit": true, "bnb_4bit_quant_type": "fp4"})"),
                     "bnb_4bit_quant_type 'fp4' is not supported");
  EXPECT_THROWS_WITH(parse_cfg(R"(, "model_type": "llama", "quantization_config": {"load_in_4bit": true})"),
                     "quantization_config has no quant_method");

  // Folders: a missing config.json, and a broken one named by its path.
  const TempDir dir("config");
  EXPECT_THROWS_WITH(load_model_config(dir.path.string()),
                     dir.path.string() + ": no config.json (is this a Hugging Face model folder?)");
  write_file_atomic(dir.file("config.json"), R"({"architectures": ["LlamaForCausalLM"], )");
  EXPECT_THROWS_WITH(load_model_config(dir.path.string()), dir.file("config.json") + ": invalid JSON at byte 40: expected a quoted key");
}

// ---------------------------------------------------------------------------------------------------------------
// JSON

TEST(io_folders_without_a_loadable_model_say_what_they_hold) {
  const TempDir dir("folders");
  const fs::path pickle = dir.path / "pickle", gguf = dir.path / "gguf", adapter = dir.path / "adapter",
                 original = dir.path / "original";
  for (const fs::path& p : {pickle, gguf, adapter, original}) fs::create_directories(p);
  write_bytes(pickle / "config.json", "{}");
  write_bytes(pickle / "pytorch_model.bin", "PK");
  EXPECT_THROWS_WITH(TensorStore::open_dir(pickle.string()),
                     "pickle: no model.safetensors or model.safetensors.index.json: it holds pytorch_model.bin, a PyTorch "
                     "pickle, which is never loaded");
  write_bytes(gguf / "model-Q4_K_M.gguf", "GGUF");
  EXPECT_THROWS_WITH(load_model_config(gguf.string()), "gguf: no config.json: it holds model-Q4_K_M.gguf, a llama.cpp file");
  EXPECT_THROWS_WITH(load_model_config((gguf / "model-Q4_K_M.gguf").string()), "model-Q4_K_M.gguf is a llama.cpp file");
  write_bytes(adapter / "adapter_config.json", "{}");
  write_bytes(adapter / "adapter_model.safetensors", "");
  EXPECT_THROWS_WITH(load_model_config(adapter.string()), "it holds adapter_config.json, so it is a LoRA adapter, not a model");
  write_bytes(original / "params.json", "{}");
  write_bytes(original / "consolidated.00.pth", "");
  EXPECT_THROWS_WITH(load_model_config(original.string()), "it holds params.json, the original checkpoint layout");
  // an empty folder: the plain sentence
  EXPECT_THROWS_WITH(load_model_config(dir.path.string()), "no config.json (is this a Hugging Face model folder?)");
}

TEST(io_json_parses_values_escapes_and_numbers) {
  const json::Value v = json::Value::parse(
      R"({"s": "a\"b\\\/\u00e9\ud83d\ude80\n\t\b\f\r\u0000", "n": -1.5e2, "z": 0, "e": 1E+2, "a": [true, false, null],)"
      R"( "o": {}, "l": []})",
      "t.json");
  EXPECT_EQ(v.find("s")->as_string("s"), std::string("a\"b\\/\xc3\xa9\xf0\x9f\x9a\x80\n\t\b\f\r\0", 17));
  EXPECT_EQ(v.find("n")->as_number("n"), -150.0);
  EXPECT_EQ(v.find("z")->as_int("z"), 0);
  EXPECT_EQ(v.find("e")->as_int("e"), 100);
  EXPECT_EQ(v.find("a")->as_array("a").size(), 3u);
  EXPECT_TRUE(v.find("a")->as_array("a")[2].is_null());
  EXPECT_TRUE(v.find("o")->is_object() && v.find("l")->is_array());
  EXPECT_TRUE(v.find("missing") == nullptr);
  EXPECT_TRUE(json::Value::parse("[1]", "t").find("x") == nullptr);
  // Raw UTF-8 passes through; a byte order mark is skipped.
  EXPECT_EQ(json::Value::parse("\xEF\xBB\xBF\"\xe4\xb8\xad\"", "t").as_string("s"), std::string("\xe4\xb8\xad"));
  // Python's json writes these for non-finite floats; literals beyond double range read as Python reads them.
  EXPECT_TRUE(std::isnan(json::Value::parse("NaN", "t").as_number("x")));
  EXPECT_EQ(json::Value::parse("-Infinity", "t").as_number("x"), -std::numeric_limits<double>::infinity());
  EXPECT_EQ(json::Value::parse("1e400", "t").as_number("x"), std::numeric_limits<double>::infinity());
  EXPECT_EQ(json::Value::parse("-12345678901234567890e300", "t").as_number("x"),
            -std::numeric_limits<double>::infinity());
  EXPECT_EQ(json::Value::parse("1e-400", "t").as_number("x"), 0.0);
  EXPECT_EQ(json::Value::parse("0.0000000000000000001e-320", "t").as_number("x"), 0.0);
  EXPECT_EQ(json::Value::parse("0.1", "t").as_number("x"), 0.1);
  EXPECT_EQ(json::Value::parse("0e999", "t").as_number("x"), 0.0);
  EXPECT_EQ(json::Value::parse("-0.000e99999999999999999999", "t").as_number("x"), 0.0);
  EXPECT_EQ(json::Value::parse("  \r\n\t5e-324 ", "t").as_number("x"), 5e-324);

  // Repeated keys: the last value at the first position (Python's behaviour), or all kept on request.
  const json::Value dup = json::Value::parse(R"({"a": 1, "b": 2, "a": 3})", "t");
  EXPECT_EQ(dup.as_object("o").size(), 2u);
  EXPECT_EQ(dup.as_object("o")[0].first, std::string("a"));
  EXPECT_EQ(dup.find("a")->as_int("a"), 3);
  const json::Value kept = json::Value::parse(R"({"a": 1, "b": 2, "a": 3})", "t", true);
  EXPECT_EQ(kept.as_object("o").size(), 3u);
  EXPECT_EQ(kept.find("a")->as_int("a"), 3);

  // Accessors name what was asked for.
  EXPECT_THROWS_WITH(v.find("n")->as_string("t.json: n"), "t.json: n: expected a string, got a number");
  EXPECT_THROWS_WITH(v.find("a")->as_object("t.json: a"), "t.json: a: expected an object, got an array");
  EXPECT_THROWS_WITH(v.find("s")->as_bool("k"), "k: expected a boolean, got a string");
  EXPECT_THROWS_WITH(json::Value::parse("1.5", "t").as_int("k"), "k: expected an integer, got 1.5");
  EXPECT_THROWS_WITH(json::Value::parse("1e300", "t").as_int("k"), "expected an integer");
  EXPECT_THROWS_WITH(json::Value::parse("NaN", "t").as_int("k"), "expected an integer, got NaN");
}

TEST(io_json_parse_errors_name_the_source_and_byte) {
  struct Case {
    std::string text;
    std::string fragment;
  };
  const Case cases[] = {
      {"", "t.json: invalid JSON at byte 0: unexpected end of input"},
      {"{\"a\": 1,}", "t.json: invalid JSON at byte 8: expected a quoted key in object"},
      {"[1,]", "at byte 3: unexpected character ']'"},
      {"[1] x", "at byte 4: unexpected text after the JSON value"},
      {"[1 2]", "at byte 3: expected ',' or ']' in array"},
      {"{\"a\" 1}", "at byte 5: expected ':' after key"},
      {"{\"a\": 1", "at byte 7: unterminated object"},
      {"{a: 1}", "at byte 1: expected a quoted key in object"},
      {"\"abc", "at byte 4: unterminated string"},
      {"\"a\nb\"", "at byte 2: control character in string"},
      {"\"\\x\"", "at byte 2: bad escape '\\x'"},
      {"\"\\u12G4\"", "bad hex digit in \\u escape"},
      {"\"\\u12", "unexpected end of input in \\u escape"},
      {"\"\\ud83d\"", "high surrogate not followed by a low surrogate"},
      {"\"\\ud83d\\u0041\"", "high surrogate not followed by a low surrogate"},
      {"\"\\ude80\"", "low surrogate without a high surrogate"},
      {"01", "at byte 0: leading zeros are not allowed"},
      {"-", "at byte 1: a number needs digits"},
      {"1.", "at byte 2: a number needs digits after '.'"},
      {"1e+", "at byte 3: a number needs digits in its exponent"},
      {"+1", "at byte 0: unexpected character '+'"},
      {".5", "unexpected character '.'"},
      {"tru", "unexpected character 't'"},
      {"nul", "unexpected character 'n'"},
      {"\xff", "at byte 0: unexpected byte 255"},
  };
  for (const Case& c : cases) EXPECT_THROWS_WITH(json::Value::parse(c.text, "t.json"), c.fragment);

  // Nesting is limited so that a hostile file cannot exhaust the stack.
  const std::string ok = std::string(256, '[') + std::string(256, ']');
  EXPECT_TRUE(json::Value::parse(ok, "t").is_array());
  const std::string deep = std::string(300, '[') + std::string(300, ']');
  EXPECT_THROWS_WITH(json::Value::parse(deep, "t.json"), "t.json: invalid JSON at byte 257: nesting deeper than 256");
}

TEST(io_json_serializes_like_python) {
  // format_double: the shortest round-trip digits, laid out as Python's repr lays them out.
  const std::pair<double, const char*> cases[] = {
      {0.1, "0.1"},
      {1.0, "1.0"},
      {-0.0, "-0.0"},
      {2.5, "2.5"},
      {100.0, "100.0"},
      {1e-05, "1e-05"},
      {0.0001, "0.0001"},
      {0.00012, "0.00012"},
      {1e-07, "1e-07"},
      {1e15, "1000000000000000.0"},
      {9999999999999998.0, "9999999999999998.0"},
      {1e16, "1e+16"},
      {1.5e10, "15000000000.0"},
      {123456789012345680.0, "1.2345678901234568e+17"},
      {1e22, "1e+22"},
      {1.5e300, "1.5e+300"},
      {5e-324, "5e-324"},
      {2.2250738585072014e-308, "2.2250738585072014e-308"},
      {1.7976931348623157e308, "1.7976931348623157e+308"},
      {-1234.5678, "-1234.5678"},
      {1.0 / 3.0, "0.3333333333333333"},
      {static_cast<double>(0.1279611587524414f), "0.1279611587524414"},
      {std::numeric_limits<double>::infinity(), "Infinity"},
      {-std::numeric_limits<double>::infinity(), "-Infinity"},
      {std::numeric_limits<double>::quiet_NaN(), "NaN"},
  };
  for (const auto& [value, text] : cases) EXPECT_EQ(json::format_double(value), std::string(text));
  // Round trip through the parser for arbitrary bit patterns.
  std::mt19937_64 rng(42);
  for (int i = 0; i < 20000; ++i) {
    const uint64_t bits = rng();
    double d;
    std::memcpy(&d, &bits, 8);
    if (!std::isfinite(d)) continue;
    const double back = json::Value::parse(json::format_double(d), "t").as_number("x");
    EXPECT_TRUE(std::memcmp(&back, &d, 8) == 0, json::format_double(d));
  }

  // dump: integral numbers below 1e15 print as integers, others via format_double; keys keep their order.
  json::Value doc = json::Value::object();
  doc.set("b", json::Value::array({json::Value::number(1), json::Value::number(2.5), json::Value::number(-3),
                                   json::Value::number(1e15), json::Value::number(1e-05)}));
  doc.set("a", json::Value::string("x\"\\\n\x01\xc3\xa9"));
  doc.set("n", json::Value::null());
  doc.set("t", json::Value::boolean(true));
  doc.set("b", json::Value::array({json::Value::number(1), json::Value::number(2.5), json::Value::number(-3),
                                   json::Value::number(1e15), json::Value::number(1e-05)}));
  EXPECT_EQ(doc.dump(), std::string(R"({"b":[1,2.5,-3,1000000000000000.0,1e-05],"a":"x\"\\\n\u0001)"
                                    "\xc3\xa9"
                                    R"(","n":null,"t":true})"));
  EXPECT_EQ(doc.dump(true), std::string(R"({"b": [1, 2.5, -3, 1000000000000000.0, 1e-05], "a": "x\"\\\n\u0001)"
                                        "\xc3\xa9"
                                        R"(", "n": null, "t": true})"));
  EXPECT_EQ(json::Value::parse(doc.dump(), "t").dump(), doc.dump());
  EXPECT_EQ(json::Value::parse(R"({"b": [1, 2.5]})", "t").dump(true), std::string(R"({"b": [1, 2.5]})"));
  EXPECT_EQ(json::Value::array().dump(), std::string("[]"));
  EXPECT_EQ(json::Value::object().dump(true), std::string("{}"));
  EXPECT_THROWS_WITH(json::Value::array().set("k", json::Value()), "json: set on an array");
  EXPECT_THROWS_WITH(json::Value::object().push_back(json::Value()), "json: push_back on an object");
}

// ---------------------------------------------------------------------------------------------------------------
// dtypes

TEST(io_dtype_names_and_sizes) {
  const std::pair<const char*, size_t> all[] = {{"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8},
                                                {"I32", 4}, {"I16", 2}, {"I8", 1},  {"U8", 1},   {"BOOL", 1}};
  for (const auto& [name, size] : all) {
    const DType t = dtype_from_name(name, "ctx");
    EXPECT_EQ(std::string(dtype_name(t)), std::string(name));
    EXPECT_EQ(dtype_size(t), size);
  }
  EXPECT_THROWS_WITH(dtype_from_name("f32", "x.safetensors: tensor 'w'"),
                     "x.safetensors: tensor 'w': dtype 'f32' is not supported (F64, F32, F16, BF16");
  EXPECT_THROWS_WITH(dtype_from_name("F8_E4M3", "ctx"), "dtype 'F8_E4M3' is not supported");
}

TEST(io_half_precision_conversions_round_to_nearest_even) {
  // bf16: the top half of an f32.
  EXPECT_EQ(bf16_to_f32(0x3F80), 1.0f);
  EXPECT_EQ(bf16_to_f32(0xC000), -2.0f);
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(f32_to_bf16(1.00390625f), 0x3F80);  // exactly halfway between 0x3F80 and 0x3F81: to even (down)
  EXPECT_EQ(f32_to_bf16(1.01171875f), 0x3F82);  // halfway between 0x3F81 and 0x3F82: to even (up)
  EXPECT_EQ(f32_to_bf16(std::nextafter(1.00390625f, 2.0f)), 0x3F81);  // just above halfway: up
  EXPECT_EQ(f32_to_bf16(-1.00390625f), 0xBF80);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::infinity()), 0x7F80);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7F80);  // rounds up into infinity, as torch does
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_EQ(round_to_bf16(3.14159265f), 3.140625f);

  // f16: known values, then every value and every tie.
  EXPECT_EQ(f16_to_f32(0x3C00), 1.0f);
  EXPECT_EQ(f16_to_f32(0xC000), -2.0f);
  EXPECT_EQ(f16_to_f32(0x7BFF), 65504.0f);
  EXPECT_EQ(f16_to_f32(0x0400), 6.103515625e-05f);           // smallest normal
  EXPECT_EQ(f16_to_f32(0x0001), 5.9604644775390625e-08f);    // smallest subnormal
  EXPECT_EQ(f16_to_f32(0x03FF), 6.097555160522461e-05f);     // largest subnormal
  EXPECT_EQ(f16_to_f32(0x8000), -0.0f);
  EXPECT_TRUE(std::signbit(f16_to_f32(0x8000)));
  EXPECT_EQ(f16_to_f32(0x7C00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(f16_to_f32(0xFC00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7E00)));
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7BFF);
  EXPECT_EQ(f32_to_f16(65519.99f), 0x7BFF);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7C00);  // halfway to 65536: to even, which is infinity
  EXPECT_EQ(f32_to_f16(1e10f), 0x7C00);
  EXPECT_EQ(f32_to_f16(-1e10f), 0xFC00);
  EXPECT_EQ(f32_to_f16(1.00048828125f), 0x3C00);  // halfway: to even
  EXPECT_EQ(f32_to_f16(5.9604644775390625e-08f), 0x0001);
  EXPECT_EQ(f32_to_f16(2.98023223876953125e-08f), 0x0000);  // half the smallest subnormal: to even (zero)
  EXPECT_EQ(f32_to_f16(std::nextafter(2.98023223876953125e-08f, 1.0f)), 0x0001);  // just above it
  EXPECT_EQ(f32_to_f16(1e-30f), 0x0000);
  EXPECT_EQ(f32_to_f16(-1e-30f), 0x8000);
  EXPECT_EQ(f32_to_f16(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(f32_to_f16(std::numeric_limits<float>::infinity()), 0x7C00);
  const uint16_t nan16 = f32_to_f16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_TRUE((nan16 & 0x7C00) == 0x7C00 && (nan16 & 0x3FF) != 0);
  for (uint32_t h = 0; h < 0x7C00; ++h) {
    // Every finite f16 survives the trip through f32, with either sign.
    EXPECT_EQ(f32_to_f16(f16_to_f32(static_cast<uint16_t>(h))), h);
    EXPECT_EQ(f32_to_f16(f16_to_f32(static_cast<uint16_t>(h | 0x8000))), h | 0x8000);
    if (h + 1 == 0x7C00) continue;
    // The midpoint to the next f16 (exact in f32) goes to the even neighbour; just above it goes up.
    const float lo = f16_to_f32(static_cast<uint16_t>(h)), hi = f16_to_f32(static_cast<uint16_t>(h + 1));
    const float mid = static_cast<float>((static_cast<double>(lo) + hi) / 2);
    EXPECT_EQ(f32_to_f16(mid), (h & 1) ? h + 1 : h);
    EXPECT_EQ(f32_to_f16(std::nextafter(mid, hi)), h + 1);
    EXPECT_EQ(f32_to_f16(std::nextafter(mid, lo)), h);
  }

  // convert_to_f32 reads unaligned little-endian elements of each floating dtype.
  uint8_t buf[1 + 16];
  const double d[2] = {0.5, -3.0};
  std::memcpy(buf + 1, d, 16);
  float out[4];
  convert_to_f32(DType::F64, buf + 1, 2, out, "ctx");
  EXPECT_EQ(out[0], 0.5f);
  EXPECT_EQ(out[1], -3.0f);
  const uint16_t h[2] = {0x3C00, 0x0001};
  std::memcpy(buf + 1, h, 4);
  convert_to_f32(DType::F16, buf + 1, 2, out, "ctx");
  EXPECT_EQ(out[1], 5.9604644775390625e-08f);
  const uint16_t bf[2] = {0x3F80, 0xC000};
  std::memcpy(buf + 1, bf, 4);
  convert_to_f32(DType::BF16, buf + 1, 2, out, "ctx");
  EXPECT_EQ(out[1], -2.0f);
  const float f[1] = {7.25f};
  std::memcpy(buf + 1, f, 4);
  convert_to_f32(DType::F32, buf + 1, 1, out, "ctx");
  EXPECT_EQ(out[0], 7.25f);
  EXPECT_THROWS_WITH(convert_to_f32(DType::I32, buf, 1, out, "x.safetensors: tensor 'w'"),
                     "x.safetensors: tensor 'w': dtype I32 is not a floating type");
}
