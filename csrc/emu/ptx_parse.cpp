/* PTX text -> Program (ptx_program.h): the subset of PTX that nvcc emits for flash_cuda's
 * kernels, parsed strictly. Grammar: PTX ISA, "Syntax" and "Instruction Statements"
 * (https://docs.nvidia.com/cuda/parallel-thread-execution/index.html#syntax). */
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <regex>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

#include "ptx_program.h"

namespace emu {
namespace ptx {

int type_bits(Type t) {
  switch (t) {
    case Type::pred: return 1;
    case Type::b8: case Type::u8: case Type::s8: return 8;
    case Type::b16: case Type::u16: case Type::s16: case Type::f16: case Type::bf16: return 16;
    case Type::b32: case Type::u32: case Type::s32: case Type::f32: case Type::f16x2: case Type::bf16x2:
    case Type::tf32: return 32;
    case Type::b64: case Type::u64: case Type::s64: case Type::f64: return 64;
    default: return 0;
  }
}
bool is_signed(Type t) { return t == Type::s8 || t == Type::s16 || t == Type::s32 || t == Type::s64; }
// The class an instruction counts under (runtime.h's InstrClass).
InstrClass classify(const Instr& in) {
  switch (in.op) {
    case Op::mma: return InstrClass::tensor;
    case Op::ld: case Op::st: case Op::atom: case Op::red: case Op::ldmatrix: case Op::cp_async:
      return InstrClass::memory;
    case Op::bra: case Op::ret: case Op::exit: case Op::trap: return InstrClass::control;
    case Op::bar_sync: case Op::bar_warp_sync: case Op::membar: case Op::shfl: case Op::cp_async_commit:
    case Op::cp_async_wait_group: case Op::cp_async_wait_all:
      return InstrClass::sync;
    case Op::mov: case Op::cvta: return InstrClass::integer;
    default: break;
  }
  auto fp = [](Type t) { return is_float(t) || t == Type::f16x2 || t == Type::bf16x2; };
  if (in.op == Op::and_ || in.op == Op::or_ || in.op == Op::xor_ || in.op == Op::not_) return InstrClass::integer;
  return fp(in.type) || fp(in.type2) ? InstrClass::fp : InstrClass::integer;
}

bool is_float(Type t) {
  return t == Type::f16 || t == Type::bf16 || t == Type::tf32 || t == Type::f32 || t == Type::f64;
}

const char* op_name(Op op) {
  static const char* names[] = {
      "mov", "add", "sub", "mul", "mad", "fma", "div", "rem", "min", "max", "neg", "abs", "copysign",
      "and", "or", "xor", "not", "shl", "shr", "bfi", "bfe", "prmt", "popc", "clz", "brev",
      "setp", "selp", "cvt", "cvta", "ex2", "lg2", "rcp", "sqrt", "rsqrt", "sin", "cos", "tanh",
      "ld", "st", "atom", "red", "bra", "ret", "exit", "trap", "bar.sync", "bar.warp.sync", "membar",
      "shfl", "mma", "ldmatrix", "cp.async", "cp.async.commit_group",
      "cp.async.wait_group", "cp.async.wait_all"};
  return names[static_cast<int>(op)];
}

namespace {

// The most registers a .reg %r<N> may declare (nvcc's largest range in the packaged PTX is about
// 20 thousand) and a kernel over all its declarations (the packaged ones: 41135 at most, the fp32
// forward at head dim 128): each takes 13 bytes a thread, 1.7 MB at the bound, 220 MB a block of
// 128 threads (at 2^20 it was 1.7 GB a block, for each worker).
constexpr long kMaxRegs = 1L << 17;
constexpr size_t kMaxLocalBytes = 512 * 1024;  // a thread's local memory (.local frames)

[[noreturn]] void fail(int line, const std::string& what) {
  throw std::invalid_argument("PTX line " + std::to_string(line) + ": " + what);
}

const std::map<std::string, Type>& type_table() {
  static const std::map<std::string, Type> t = {
      {"pred", Type::pred}, {"b8", Type::b8}, {"b16", Type::b16}, {"b32", Type::b32}, {"b64", Type::b64},
      {"u8", Type::u8}, {"u16", Type::u16}, {"u32", Type::u32}, {"u64", Type::u64}, {"s8", Type::s8},
      {"s16", Type::s16}, {"s32", Type::s32}, {"s64", Type::s64}, {"f16", Type::f16}, {"f16x2", Type::f16x2},
      {"bf16", Type::bf16}, {"bf16x2", Type::bf16x2}, {"tf32", Type::tf32}, {"f32", Type::f32}, {"f64", Type::f64}};
  return t;
}

bool as_type(const std::string& s, Type* t) {
  auto it = type_table().find(s);
  if (it == type_table().end()) return false;
  *t = it->second;
  return true;
}

std::string strip(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && std::isspace(static_cast<unsigned char>(s[a]))) ++a;
  while (b > a && std::isspace(static_cast<unsigned char>(s[b - 1]))) --b;
  return s.substr(a, b - a);
}

std::vector<std::string> split_dots(const std::string& s) {
  std::vector<std::string> parts;
  size_t start = 0;
  for (;;) {
    size_t d = s.find('.', start);
    parts.push_back(s.substr(start, d == std::string::npos ? std::string::npos : d - start));
    if (d == std::string::npos) break;
    start = d + 1;
  }
  return parts;
}

// Comments removed, line numbers kept (a block comment keeps its newlines).
std::string without_comments(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '/' && i + 1 < text.size() && text[i + 1] == '/') {
      while (i < text.size() && text[i] != '\n') ++i;
      if (i < text.size()) out += '\n';
    } else if (text[i] == '/' && i + 1 < text.size() && text[i + 1] == '*') {
      i += 2;
      while (i + 1 < text.size() && !(text[i] == '*' && text[i + 1] == '/')) {
        if (text[i] == '\n') out += '\n';
        ++i;
      }
      ++i;
    } else {
      out += text[i];
    }
  }
  return out;
}

// One statement of a body: text without the ';', the line of its first character; or a
// scope brace.
struct Stmt {
  enum Kind { text, open, close } kind;
  std::string s;
  int line;
};

struct Symbol {
  Space space;
  int64_t address;
};

class Parser {
 public:
  Parser(const std::string& text, const std::string& entry) : src_(without_comments(text)), entry_(entry) {}

  std::shared_ptr<Program> run() {
    prog_ = std::make_shared<Program>();
    prog_->entry = entry_;
    prog_->site_file = entry_ + ".ptx";
    module_symbols();
    const size_t body = entry_header();
    statements(body);
    resolve_labels();
    return prog_;
  }

 private:
  const std::string src_;
  const std::string entry_;
  std::shared_ptr<Program> prog_;
  std::unordered_map<std::string, Symbol> symbols_;
  std::vector<std::unordered_map<std::string, uint32_t>> scopes_;
  std::unordered_map<std::string, uint32_t> labels_;
  std::vector<std::pair<size_t, std::string>> branch_fixups_;  // instruction, label
  int line_ = 0;

  int line_at(size_t pos) const { return 1 + static_cast<int>(std::count(src_.begin(), src_.begin() + pos, '\n')); }

  // Module-level .shared declarations: the dynamic (extern) array starts at shared address 0,
  // as the launch's dynamic shared memory is the runtime's whole arena.
  void module_symbols() {
    size_t depth = 0;
    std::string cur;
    int line = 1, start_line = 1;
    for (size_t i = 0; i < src_.size(); ++i) {
      const char c = src_[i];
      if (c == '\n') ++line;
      if (c == '{') ++depth;
      else if (c == '}') --depth;
      else if (depth == 0 && c == ';') {
        const std::string s = strip(cur);
        if (s.find(".shared") != std::string::npos && s.rfind(".entry", 0) != 0) {
          const size_t bracket = s.find('[');
          size_t name_end = bracket == std::string::npos ? s.size() : bracket;
          size_t name_start = s.find_last_of(" \t", name_end - 1) + 1;
          const std::string name = s.substr(name_start, name_end - name_start);
          if (s.find(".extern") == std::string::npos)
            fail(start_line, "static .shared variable " + name + ": only dynamic (extern) shared memory is supported");
          symbols_[name] = {Space::shared, 0};
        } else if (s.find(".global ") != std::string::npos || s.find(".const ") != std::string::npos) {
          if (s.find(".entry") == std::string::npos && s.find(".func") == std::string::npos)
            fail(start_line, "module-level .global/.const variables are not supported: " + s);
        }
        cur.clear();
        continue;
      }
      if (depth == 0) {
        if (cur.empty() && std::isspace(static_cast<unsigned char>(c))) continue;
        if (cur.empty()) start_line = line;
        cur += c;
        if (c == ')' && cur.find(".entry") != std::string::npos) cur.clear();  // an entry's header
        if (c == ')' && cur.find(".func") != std::string::npos) cur.clear();
      } else {
        cur.clear();
      }
    }
  }

  // Finds ".entry <name>(" and its parameter list; returns the position of the body's '{'.
  size_t entry_header() {
    size_t pos = 0;
    for (;;) {
      pos = src_.find(".entry", pos);
      if (pos == std::string::npos) throw std::invalid_argument("PTX has no .entry named " + entry_);
      size_t n = pos + 6;
      while (n < src_.size() && std::isspace(static_cast<unsigned char>(src_[n]))) ++n;
      if (src_.compare(n, entry_.size(), entry_) == 0 &&
          (n + entry_.size() < src_.size()) && (src_[n + entry_.size()] == '(' || std::isspace(static_cast<unsigned char>(src_[n + entry_.size()])))) {
        pos = n + entry_.size();
        break;
      }
      pos = n;
    }
    const size_t open = src_.find('(', pos), close = src_.find(')', open);
    if (open == std::string::npos || close == std::string::npos) fail(line_at(pos), "entry " + entry_ + " has no parameter list");
    // .param .align A .b8 NAME[N] / .param .u64 NAME, ... : offsets in declaration order.
    std::string params = src_.substr(open + 1, close - open - 1);
    size_t offset = 0, start = 0;
    while (start < params.size()) {
      size_t comma = params.find(',', start);
      std::string p = strip(params.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
      start = comma == std::string::npos ? params.size() : comma + 1;
      if (p.empty()) continue;
      std::istringstream in(p);
      std::string word, name;
      size_t align = 0, bytes = 0;
      Type t = Type::none;
      while (in >> word) {
        if (word == ".param") continue;
        if (word == ".align") { in >> align; continue; }
        if (word[0] == '.' && as_type(word.substr(1), &t)) continue;
        if (word[0] == '.' && word == ".ptr") continue;
        name = word;
      }
      const int bits = type_bits(t);
      if (bits == 0) fail(line_at(open), "parameter of unknown type: " + p);
      const size_t elem = bits / 8;
      bytes = elem;
      const size_t br = name.find('[');
      if (br != std::string::npos) {
        bytes = elem * std::strtoull(name.c_str() + br + 1, nullptr, 10);
        name = name.substr(0, br);
      }
      if (align == 0) align = elem;
      offset = (offset + align - 1) / align * align;
      symbols_[name] = {Space::param, static_cast<int64_t>(offset)};
      offset += bytes;
    }
    prog_->param_bytes = offset;
    const size_t brace = src_.find('{', close);
    if (brace == std::string::npos) fail(line_at(close), "entry " + entry_ + " has no body");
    for (size_t i = close + 1; i < brace; ++i)
      if (src_[i] == ';') fail(line_at(i), "entry " + entry_ + " is a declaration without a body");
    return brace;
  }

  // The body from its '{' to the matching '}', as statements.
  void statements(size_t body) {
    int line = line_at(body);
    std::string cur;
    char last = 0;  // cur's last non-space character, 0 while it is blank (no re-strip per character)
    int cur_line = line, depth = 0, vec_depth = 0, bracket = 0;
    for (size_t i = body; i < src_.size(); ++i) {
      const char c = src_[i];
      if (c == '\n') ++line;
      bool empty = last == 0;
      if (c == '{' && !empty && vec_depth == 0 && last == ':') {  // "label: { ... }"
        statement({Stmt::text, strip(cur), cur_line});
        cur.clear();
        last = 0;
        empty = true;
      }
      if (c == '{' && empty) {
        ++depth;
        statement({Stmt::open, "", line});
        cur.clear();
        last = 0;
        continue;
      }
      if (c == '}' && vec_depth == 0) {
        if (!empty) fail(cur_line, "statement without ';': " + strip(cur));
        --depth;
        statement({Stmt::close, "", line});
        cur.clear();
        last = 0;
        if (depth == 0) return;
        continue;
      }
      if (c == '{') ++vec_depth;
      if (c == '}') --vec_depth;
      if (c == '[') ++bracket;
      if (c == ']') --bracket;
      if (c == ';' && vec_depth == 0 && bracket == 0) {
        statement({Stmt::text, strip(cur), cur_line});
        cur.clear();
        last = 0;
        continue;
      }
      if (!std::isspace(static_cast<unsigned char>(c))) {
        if (empty) cur_line = line;
        last = c;
      }
      cur += c;
    }
    fail(line, "entry " + entry_ + ": body not closed");
  }

  void statement(Stmt st) {
    line_ = st.line;
    if (st.kind == Stmt::open) { scopes_.emplace_back(); return; }
    if (st.kind == Stmt::close) { scopes_.pop_back(); return; }
    std::string s = st.s;
    // labels: NAME: (possibly several)
    for (;;) {
      size_t colon = s.find(':');
      if (colon == std::string::npos) break;
      const std::string head = strip(s.substr(0, colon));
      if (head.empty() || head.find_first_of(" \t[{,") != std::string::npos) break;
      if (labels_.count(head)) fail(line_, "label " + head + " defined twice");
      labels_[head] = static_cast<uint32_t>(prog_->code.size());
      s = strip(s.substr(colon + 1));
    }
    if (s.empty()) return;
    if (s[0] == '.') { directive(s); return; }
    instruction(s);
  }

  void directive(const std::string& s) {
    std::istringstream in(s);
    std::string d;
    in >> d;
    if (d == ".pragma" || d == ".loc" || d == ".file") return;
    if (d == ".reg") {
      std::string type_word, rest;
      in >> type_word;
      std::getline(in, rest);
      Type t;
      if (type_word.size() < 2 || !as_type(type_word.substr(1), &t)) fail(line_, "register of unknown type: " + s);
      size_t start = 0;
      while (start < rest.size()) {
        size_t comma = rest.find(',', start);
        std::string name = strip(rest.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
        start = comma == std::string::npos ? rest.size() : comma + 1;
        if (name.empty()) continue;
        const size_t lt = name.find('<');
        if (lt != std::string::npos) {  // %r<N>: %r0 .. %r(N-1)
          const std::string base = name.substr(0, lt);
          char* end = nullptr;
          errno = 0;
          const long count = std::strtol(name.c_str() + lt + 1, &end, 10);
          // nvcc declares what a kernel uses (kMaxRegs' comment); past kMaxRegs a typo or an
          // overflow would insert registers until memory runs out
          if (errno != 0 || end == name.c_str() + lt + 1 || *end != '>' || count < 0 || count > kMaxRegs)
            fail(line_, "register count must be an integer in [0, " + std::to_string(kMaxRegs) + "]: " + s);
          // the bound is the kernel's, over all its declarations (each under it took 1.7 GB more
          // for a 64-row call; an audit); declare() checks it for single names too
          if (prog_->nregs + count > kMaxRegs)
            fail(line_, "the kernel declares more than " + std::to_string(kMaxRegs) + " registers in all: " + s);
          for (long k = 0; k < count; ++k) declare(base + std::to_string(k), t);
        } else {
          declare(name, t);
        }
      }
      return;
    }
    if (d == ".local") {  // .local .align A .b8 name[N]: the thread's stack frame (nvcc's __local_depot)
      std::smatch m;
      static const std::regex re(R"(^\.local\s+\.align\s+(\d+)\s+\.b8\s+([A-Za-z_$%][A-Za-z0-9_$]*)\[(\d+)\]\s*;?$)");
      if (!std::regex_match(s, m, re)) fail(line_, "expects .local .align A .b8 name[N]: " + s);
      // a thread's local memory is at most 512 KiB on every GPU the kernels run on (CUDA's
      // limits table): past that, a typo or an overflow would allocate per thread until memory ran out
      const std::string align_s = m[1], bytes_s = m[3];
      if (align_s.size() > 7 || bytes_s.size() > 7 || std::stoul(bytes_s) > kMaxLocalBytes ||
          std::stoul(align_s) == 0 || std::stoul(align_s) > 4096)
        fail(line_, ".local needs an alignment in [1, 4096] and at most " + std::to_string(kMaxLocalBytes) +
                        " bytes: " + s);
      const size_t align = std::stoul(align_s), bytes = std::stoul(bytes_s);
      const size_t at = (prog_->local_bytes + align - 1) / align * align;
      if (at + bytes > kMaxLocalBytes)  // over all the kernel's .local declarations
        fail(line_, "the kernel's .local declarations take more than " + std::to_string(kMaxLocalBytes) +
                        " bytes in all: " + s);
      symbols_[m[2]] = {Space::local, static_cast<int64_t>(at)};
      prog_->local_bytes = at + bytes;
      return;
    }
    if (d == ".shared") fail(line_, "shared variables inside a kernel are not supported: " + s);
    fail(line_, "unsupported directive: " + s);
  }

  void declare(const std::string& name, Type t) {
    if (prog_->nregs >= kMaxRegs)
      fail(line_, "the kernel declares more than " + std::to_string(kMaxRegs) + " registers in all: " + name);
    if (scopes_.empty()) scopes_.emplace_back();
    scopes_.back()[name] = prog_->nregs++;
    prog_->reg_names.push_back(name);
    prog_->reg_types.push_back(t);
  }

  uint32_t reg(const std::string& name) {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto f = it->find(name);
      if (f != it->end()) return f->second;
    }
    fail(line_, "undeclared register " + name);
  }

  bool is_reg_name(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it)
      if (it->count(name)) return true;
    return false;
  }

  static std::vector<std::string> split_operands(const std::string& s) {
    std::vector<std::string> out;
    int depth = 0;
    std::string cur;
    for (char c : s) {
      if (c == '[' || c == '{') ++depth;
      if (c == ']' || c == '}') --depth;
      if (c == ',' && depth == 0) {
        out.push_back(strip(cur));
        cur.clear();
      } else {
        cur += c;
      }
    }
    if (!strip(cur).empty()) out.push_back(strip(cur));
    return out;
  }

  bool number(const std::string& s, int64_t* v) {
    if (s.empty()) return false;
    const char* p = s.c_str();
    if (s.size() == 10 && (s.compare(0, 2, "0f") == 0 || s.compare(0, 2, "0F") == 0)) {
      *v = static_cast<int64_t>(std::strtoull(p + 2, nullptr, 16));
      return true;
    }
    if (s.size() == 18 && (s.compare(0, 2, "0d") == 0 || s.compare(0, 2, "0D") == 0)) {
      *v = static_cast<int64_t>(std::strtoull(p + 2, nullptr, 16));
      return true;
    }
    bool neg = false;
    if (*p == '-') { neg = true; ++p; }
    if (!std::isdigit(static_cast<unsigned char>(*p))) return false;
    char* end = nullptr;
    uint64_t u;
    errno = 0;
    if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) u = std::strtoull(p + 2, &end, 16);
    else u = std::strtoull(p, &end, 10);
    if (errno == ERANGE || (neg && u > (uint64_t{1} << 63))) fail(line_, "constant out of the 64-bit range: " + s);
    if (*end == 'U' || *end == 'u') ++end;
    if (*end != '\0') return false;
    *v = neg ? -static_cast<int64_t>(u) : static_cast<int64_t>(u);
    return true;
  }

  Operand operand(const std::string& text, Instr& in) {
    Operand o;
    std::string s = strip(text);
    if (s.empty()) fail(line_, "empty operand");
    if (s == "_") return o;  // sink
    if (s[0] == '!') {
      o = operand(s.substr(1), in);
      if (o.kind != Operand::Kind::reg) fail(line_, "'!' applies to a predicate register: " + s);
      o.negate = true;
      return o;
    }
    if (s[0] == '{') {
      if (s.back() != '}') fail(line_, "unterminated vector operand: " + s);
      auto elems = split_operands(s.substr(1, s.size() - 2));
      o.kind = Operand::Kind::vec;
      o.first = static_cast<uint32_t>(prog_->vec.size());
      o.count = static_cast<uint32_t>(elems.size());
      std::vector<Operand> parsed;
      for (auto& e : elems) parsed.push_back(operand(e, in));
      for (auto& e : parsed) prog_->vec.push_back(e);
      return o;
    }
    if (s[0] == '[') {
      if (s.back() != ']') fail(line_, "unterminated address operand: " + s);
      std::string a = strip(s.substr(1, s.size() - 2));
      o.kind = Operand::Kind::addr;
      size_t plus = a.find('+', 1);
      std::string base = strip(plus == std::string::npos ? a : a.substr(0, plus));
      if (plus != std::string::npos) {
        int64_t off;
        if (!number(strip(a.substr(plus + 1)), &off)) fail(line_, "bad address offset: " + s);
        o.imm = off;
      }
      int64_t absolute;
      if (is_reg_name(base)) {
        o.reg = reg(base);
      } else if (symbols_.count(base)) {
        o.imm += symbols_[base].address;
      } else if (number(base, &absolute)) {
        o.imm += absolute;
      } else {
        fail(line_, "unknown address base " + base);
      }
      return o;
    }
    static const std::map<std::string, Special> specials = {
        {"%tid.x", Special::tid_x}, {"%tid.y", Special::tid_y}, {"%tid.z", Special::tid_z},
        {"%ntid.x", Special::ntid_x}, {"%ntid.y", Special::ntid_y}, {"%ntid.z", Special::ntid_z},
        {"%ctaid.x", Special::ctaid_x}, {"%ctaid.y", Special::ctaid_y}, {"%ctaid.z", Special::ctaid_z},
        {"%nctaid.x", Special::nctaid_x}, {"%nctaid.y", Special::nctaid_y}, {"%nctaid.z", Special::nctaid_z},
        {"%laneid", Special::laneid}, {"%warpid", Special::warpid}, {"%nwarpid", Special::nwarpid},
        {"%lanemask_lt", Special::lanemask_lt}};
    auto sp = specials.find(s);
    if (sp != specials.end()) {
      o.kind = Operand::Kind::special;
      o.imm = static_cast<int64_t>(sp->second);
      return o;
    }
    if (is_reg_name(s)) {
      o.kind = Operand::Kind::reg;
      o.reg = reg(s);
      return o;
    }
    int64_t v;
    if (number(s, &v)) {
      o.kind = Operand::Kind::imm;
      o.imm = v;
      return o;
    }
    auto sym = symbols_.find(s);
    if (sym != symbols_.end()) {
      // a shared variable's shared address, a local one's local address (an offset into the
      // thread's frame), or a kernel parameter's param-space address
      o.kind = Operand::Kind::imm;
      o.imm = sym->second.address;
      return o;
    }
    (void)in;
    if (s[0] == '%') fail(line_, "undeclared register " + s);
    fail(line_, "unknown operand " + s);
  }

  void instruction(const std::string& text) {
    Instr in;
    in.site = Site(nullptr, line_);
    std::string s = text;
    if (s[0] == '@') {
      size_t sp = s.find_first_of(" \t");
      std::string g = s.substr(1, sp - 1);
      if (!g.empty() && g[0] == '!') { in.guard_negate = true; g = g.substr(1); }
      in.guard = reg(g);
      s = strip(s.substr(sp));
    }
    size_t sp = s.find_first_of(" \t");
    const std::string opcode = s.substr(0, sp);
    const std::string rest = sp == std::string::npos ? "" : strip(s.substr(sp));
    std::vector<std::string> ops = rest.empty() ? std::vector<std::string>{} : split_operands(rest);
    decode(opcode, in);
    if (in.op == Op::bra) {
      if (ops.size() != 1) fail(line_, "bra takes one label");
      branch_fixups_.emplace_back(prog_->code.size(), ops[0]);
      in.cls = static_cast<uint8_t>(InstrClass::control);
      prog_->code.push_back(in);
      return;
    }
    // shfl's "d|p" and setp's "p|q" destinations: two operands
    std::vector<std::string> expanded;
    for (size_t i = 0; i < ops.size(); ++i) {
      const size_t bar = ops[i].find('|');
      if (i == 0 && bar != std::string::npos) {
        expanded.push_back(ops[i].substr(0, bar));
        expanded.push_back(ops[i].substr(bar + 1));
        in.flags |= 1u << 31;  // has a second destination
      } else {
        expanded.push_back(ops[i]);
      }
    }
    if (expanded.size() > 6) fail(line_, "too many operands");
    in.n = static_cast<uint8_t>(expanded.size());
    for (size_t i = 0; i < expanded.size(); ++i) in.o[i] = operand(expanded[i], in);
    check_shape(in, opcode);
    in.cls = static_cast<uint8_t>(classify(in));
    prog_->code.push_back(in);
  }

  void need(bool ok, const std::string& opcode, const char* what) {
    if (!ok) fail(line_, opcode + ": " + what);
  }

  // Operand counts and kinds the executor relies on.
  void check_shape(const Instr& in, const std::string& opcode) {
    const bool second = in.flags >> 31;
    const int n = in.n - (second ? 1 : 0);
    auto is = [&](int i, Operand::Kind k) { return i < in.n && in.o[i].kind == k; };
    switch (in.op) {
      case Op::ld: case Op::ldmatrix:
        need(n == 2 && is(1, Operand::Kind::addr), opcode, "expects a destination and an address");
        if (in.op == Op::ld) need_vector(in, in.o[0], opcode);
        break;
      case Op::st:
        need(n == 2 && is(0, Operand::Kind::addr), opcode, "expects an address and a value");
        need_vector(in, in.o[1], opcode);
        break;
      case Op::cp_async: need((n == 3 || n == 4) && is(0, Operand::Kind::addr) && is(1, Operand::Kind::addr), opcode, "expects [dst], [src], cp-size{, src-size}"); break;
      case Op::atom: need(n == 3 && is(1, Operand::Kind::addr), opcode, "expects d, [a], b"); break;
      case Op::red: need(n == 2 && is(0, Operand::Kind::addr), opcode, "expects [a], b"); break;
      case Op::mma: need(n == 4 && is(0, Operand::Kind::vec) && is(1, Operand::Kind::vec) && is(2, Operand::Kind::vec) && is(3, Operand::Kind::vec), opcode, "expects four vector operands"); break;
      case Op::shfl: need(n == 5, opcode, "expects d[|p], a, b, c, membermask"); break;
      case Op::setp: need(n == 3 || n == 4, opcode, "expects p[|q], a, b{, c}"); break;
      case Op::selp: need(n == 4, opcode, "expects d, a, b, c"); break;
      case Op::fma: case Op::mad: need(n == 4, opcode, "expects d, a, b, c"); break;
      case Op::bfi: need(n == 5, opcode, "expects d, a, b, c, d"); break;
      case Op::bfe: case Op::prmt: need(n == 4, opcode, "expects four operands"); break;
      case Op::cp_async_wait_group: need(n == 1 && is(0, Operand::Kind::imm), opcode, "expects a constant"); break;
      case Op::bar_sync:  // barrier 0 of the whole block; named barriers and thread counts are not modelled
        need(n == 1 && is(0, Operand::Kind::imm) && in.o[0].imm == 0, opcode,
             "only bar.sync 0 (all threads of the block) is supported by the PTX executor");
        break;
      default: break;
    }
    for (int i = 0; i < in.n; ++i)
      if (in.o[i].kind == Operand::Kind::addr && in.op != Op::ld && in.op != Op::st && in.op != Op::ldmatrix &&
          in.op != Op::cp_async && in.op != Op::atom && in.op != Op::red)
        fail(line_, opcode + ": an address operand where none is allowed");
  }

  // ld/st .v2/.v4 move a brace list of exactly that many registers, a scalar one register (a
  // shorter list took the next registers' places: audit)
  void need_vector(const Instr& in, const Operand& o, const std::string& opcode) {
    if (in.vec > 1)
      need(o.kind == Operand::Kind::vec && o.count == in.vec, opcode,
           in.vec == 2 ? "expects a list of 2 registers {a, b} for .v2" : "expects a list of 4 registers {a, b, c, d} for .v4");
    else
      need(o.kind != Operand::Kind::vec, opcode, "expects one register (a list needs .v2 or .v4)");
  }

  // The table in decode() takes each modifier on any opcode; the executor computes some on some
  // opcodes and types only, and elsewhere one would be dropped silently (add.sat.s32 wrapped,
  // max.relu.s32 kept negatives, .ftz on an integer add passed; audit). Those are refused here,
  // as are the spaces and opcodes the executor would refuse only when it reached them.
  void check_modifiers(const Instr& in, const std::string& opcode) {
    auto floating = [](Type t) { return is_float(t) || t == Type::f16x2 || t == Type::bf16x2; };
    auto refuse = [&](const char* m) { fail(line_, "unsupported modifier ." + std::string(m) + " of " + opcode); };
    const bool any_float = floating(in.type) || (in.op == Op::cvt && floating(in.type2));
    const bool integer = !floating(in.type) && in.type != Type::pred && in.type != Type::none;
    // .ftz is computed on f32 operands (and a cvt from or to f32), not on 16-bit ones
    if ((in.flags & kFtz) && !(in.type == Type::f32 || (in.op == Op::cvt && in.type2 == Type::f32))) refuse("ftz");
    if ((in.flags & (kApprox | kFull)) && !any_float) refuse(in.flags & kApprox ? "approx" : "full");
    if (in.flags & kSat) {
      const bool ok = (in.type == Type::f32 && (in.op == Op::add || in.op == Op::sub || in.op == Op::mul ||
                                                 in.op == Op::fma || in.op == Op::mad)) ||
                      (in.op == Op::cvt && ((in.type == Type::f32 && floating(in.type2)) || !floating(in.type))) ||
                      ((in.op == Op::add || in.op == Op::sub) && in.type == Type::s32);
      if (!ok) refuse("sat");
    }
    if (in.flags & kRelu) {
      const bool half = in.type == Type::f16 || in.type == Type::bf16 || in.type == Type::f16x2 || in.type == Type::bf16x2;
      if (!((in.op == Op::cvt && (in.type == Type::f16x2 || in.type == Type::bf16x2)) || (in.op == Op::fma && half)))
        refuse("relu");
    }
    if ((in.flags & (kWide | kLo | kHi)) && !((in.op == Op::mul || in.op == Op::mad) && integer))
      refuse(in.flags & kWide ? "wide" : in.flags & kLo ? "lo" : "hi");
    if (in.flags & kShiftClamp) refuse("clamp");
    if ((in.flags & kTrans) && in.op != Op::ldmatrix) refuse("trans");
    if ((in.flags & kToSpace) && in.op != Op::cvta) refuse("to");
    if (in.vec > 1 && in.op != Op::ld && in.op != Op::st) refuse(in.vec == 2 ? "v2" : "v4");
    if (in.space == Space::constant) fail(line_, opcode + ": constant memory is not supported by the PTX executor");
    if ((in.op == Op::atom || in.op == Op::red) && in.type != Type::f32)
      fail(line_, opcode + ": only atom/red .add.f32 are supported by the PTX executor");
  }

  void decode(const std::string& opcode, Instr& in) {
    auto parts = split_dots(opcode);
    const std::string& base = parts[0];
    std::vector<Type> types;
    auto unknown = [&](const std::string& m) { fail(line_, "unsupported modifier ." + m + " of " + opcode); };
    static const std::map<std::string, Op> ops = {
        {"mov", Op::mov}, {"add", Op::add}, {"sub", Op::sub}, {"mul", Op::mul}, {"mad", Op::mad}, {"fma", Op::fma},
        {"div", Op::div}, {"rem", Op::rem}, {"min", Op::min}, {"max", Op::max}, {"neg", Op::neg}, {"abs", Op::abs},
        {"copysign", Op::copysign},
        {"and", Op::and_}, {"or", Op::or_}, {"xor", Op::xor_}, {"not", Op::not_}, {"shl", Op::shl}, {"shr", Op::shr},
        {"bfi", Op::bfi}, {"bfe", Op::bfe}, {"prmt", Op::prmt}, {"popc", Op::popc}, {"clz", Op::clz}, {"brev", Op::brev},
        {"setp", Op::setp}, {"selp", Op::selp}, {"cvt", Op::cvt}, {"cvta", Op::cvta}, {"ex2", Op::ex2}, {"lg2", Op::lg2},
        {"rcp", Op::rcp}, {"sqrt", Op::sqrt}, {"rsqrt", Op::rsqrt}, {"sin", Op::sin}, {"cos", Op::cos}, {"tanh", Op::tanh},
        {"ld", Op::ld}, {"st", Op::st}, {"atom", Op::atom}, {"red", Op::red}, {"bra", Op::bra}, {"ret", Op::ret},
        {"exit", Op::exit}, {"trap", Op::trap}, {"membar", Op::membar}, {"fence", Op::membar}, {"shfl", Op::shfl},
        {"mma", Op::mma}, {"ldmatrix", Op::ldmatrix}};
    if (base == "bar" || base == "barrier") {
      if (parts.size() >= 2 && parts[1] == "warp" && parts.size() == 3 && parts[2] == "sync") { in.op = Op::bar_warp_sync; return; }
      if (parts.size() == 2 && (parts[1] == "sync") ) { in.op = Op::bar_sync; return; }
      if (parts.size() == 3 && parts[1] == "sync" && parts[2] == "aligned") { in.op = Op::bar_sync; return; }
      fail(line_, "unsupported barrier " + opcode);
    }
    if (base == "cp" && parts.size() >= 2 && parts[1] == "async") {
      if (parts.size() == 3 && parts[2] == "commit_group") { in.op = Op::cp_async_commit; return; }
      if (parts.size() == 3 && parts[2] == "wait_group") { in.op = Op::cp_async_wait_group; return; }
      if (parts.size() == 3 && parts[2] == "wait_all") { in.op = Op::cp_async_wait_all; return; }
      in.op = Op::cp_async;
      bool shared = false, global = false;
      for (size_t i = 2; i < parts.size(); ++i) {
        const std::string& m = parts[i];
        if (m == "ca") continue;
        if (m == "cg") in.flags |= kCg;
        else if (m == "shared") shared = true;
        else if (m == "global") global = true;
        else if (m == "L2::128B" || m == "L2::64B" || m == "L2::256B") continue;
        else unknown(m);
      }
      if (!shared || !global) fail(line_, opcode + ": only cp.async.{ca,cg}.shared.global is supported");
      return;
    }
    if (base == "vote" || base == "activemask")  // (no packaged kernel uses them)
      fail(line_, opcode + ": " + base + " is not supported by the PTX executor");
    auto it = ops.find(base);
    if (it == ops.end()) fail(line_, "unsupported instruction " + opcode);
    in.op = it->second;
    for (size_t i = 1; i < parts.size(); ++i) {
      const std::string& m = parts[i];
      Type t;
      if (as_type(m, &t)) { types.push_back(t); continue; }
      if (m == "ftz") in.flags |= kFtz;
      else if (m == "sat") in.flags |= kSat;
      else if (m == "approx") in.flags |= kApprox;
      else if (m == "full") in.flags |= kFull;
      else if (m == "lo") in.flags |= kLo;
      else if (m == "hi") in.flags |= kHi;
      else if (m == "wide") in.flags |= kWide;
      else if (m == "uni" || m == "sync" || m == "aligned" || m == "row" || m == "col" || m == "volatile" ||
               m == "relaxed" || m == "gpu" || m == "cta" || m == "sys" || m == "nc" || m == "ca" || m == "cg" ||
               m == "cs" || m == "lu" || m == "cv" || m == "wb" || m == "wt" || m == "acq_rel" || m == "sc" ||
               m == "L1::no_allocate" || m == "L2::128B" || m == "L2::256B" || m == "L1::evict_last")
        continue;
      else if (m == "relu") in.flags |= kRelu;
      else if (m == "clamp") in.flags |= kShiftClamp;
      else if (m == "trans") in.flags |= kTrans;
      else if (m == "to") in.flags |= kToSpace;
      else if (m == "global") in.space = Space::global;
      else if (m == "shared") in.space = Space::shared;
      else if (m == "param") in.space = Space::param;
      else if (m == "local") in.space = Space::local;
      else if (m == "const") in.space = Space::constant;
      else if (m == "v2") in.vec = 2;
      else if (m == "v4") in.vec = 4;
      else if (m == "rn") in.round = Round::rn;
      else if (m == "rz") in.round = Round::rz;
      else if (m == "rm") in.round = Round::rm;
      else if (m == "rp") in.round = Round::rp;
      else if (m == "rna") in.round = Round::rna;
      else if (m == "rni") in.round = Round::rni;
      else if (m == "rzi") in.round = Round::rzi;
      else if (m == "rmi") in.round = Round::rmi;
      else if (m == "rpi") in.round = Round::rpi;
      else if (in.op == Op::shfl && (m == "up" || m == "down" || m == "bfly" || m == "idx"))
        in.mode = m == "up" ? 0 : m == "down" ? 1 : m == "bfly" ? 2 : 3;
      else if (in.op == Op::setp && set_cmp(m, in)) continue;
      else if (in.op == Op::setp && (m == "and" || m == "or" || m == "xor"))
        in.bop = m == "and" ? BoolOp::and_ : m == "or" ? BoolOp::or_ : BoolOp::xor_;
      else if ((in.op == Op::atom || in.op == Op::red) && m == "add") in.mode = 0;
      else if (in.op == Op::mma && m.size() > 2 && m[0] == 'm' && m.find('n') != std::string::npos) {
        if (m == "m16n8k16") in.mode = 16;
        else if (m == "m16n8k8") in.mode = 8;
        else unknown(m);
      } else if (in.op == Op::ldmatrix && (m == "m8n8")) continue;
      else if (in.op == Op::ldmatrix && (m == "x1" || m == "x2" || m == "x4")) in.mode = static_cast<uint8_t>(m[1] - '0');
      else unknown(m);
    }
    // Types: the last is the instruction type; cvt: d type then a type; mma: .dtype.atype.btype.ctype
    if (in.op == Op::cvt) {
      if (types.size() != 2) fail(line_, opcode + ": cvt needs a destination and a source type");
      in.type = types[0];
      in.type2 = types[1];
    } else if (in.op == Op::mma) {
      if (types.size() != 4 || types[0] != Type::f32 || types[3] != Type::f32 || types[1] != types[2])
        fail(line_, opcode + ": only f32-accumulating mma with equal A and B types is supported");
      in.type = Type::f32;
      in.type2 = types[1];
      if (in.mode == 16 && in.type2 != Type::f16 && in.type2 != Type::bf16) fail(line_, opcode + ": m16n8k16 takes f16 or bf16");
      if (in.mode == 8 && in.type2 != Type::f16 && in.type2 != Type::bf16 && in.type2 != Type::tf32)
        fail(line_, opcode + ": m16n8k8 takes f16, bf16 or tf32");
      if (in.mode == 0) fail(line_, opcode + ": missing shape");
    } else if (in.op == Op::ldmatrix) {
      if (in.mode == 0 || in.space != Space::shared) fail(line_, opcode + ": expects .m8n8.x{1,2,4}[.trans].shared.b16");
      in.type = Type::b16;
    } else {
      if (types.size() > 1) fail(line_, opcode + ": more than one type");
      if (!types.empty()) in.type = types[0];
    }
    const bool untyped = in.op == Op::bra || in.op == Op::ret || in.op == Op::exit || in.op == Op::trap ||
                         in.op == Op::bar_sync || in.op == Op::membar || in.op == Op::ldmatrix;
    if (in.type == Type::none && !untyped) fail(line_, opcode + ": missing type");
    check_modifiers(in, opcode);
  }

  static bool set_cmp(const std::string& m, Instr& in) {
    static const std::map<std::string, Cmp> cmps = {
        {"eq", Cmp::eq}, {"ne", Cmp::ne}, {"lt", Cmp::lt}, {"le", Cmp::le}, {"gt", Cmp::gt}, {"ge", Cmp::ge},
        {"lo", Cmp::lo}, {"ls", Cmp::ls}, {"hi", Cmp::hi}, {"hs", Cmp::hs}, {"equ", Cmp::equ}, {"neu", Cmp::neu},
        {"ltu", Cmp::ltu}, {"leu", Cmp::leu}, {"gtu", Cmp::gtu}, {"geu", Cmp::geu}, {"num", Cmp::num}, {"nan", Cmp::nan}};
    auto it = cmps.find(m);
    if (it == cmps.end()) return false;
    in.cmp = it->second;
    return true;
  }

  void resolve_labels() {
    for (auto& f : branch_fixups_) {
      auto it = labels_.find(f.second);
      if (it == labels_.end()) fail(prog_->code[f.first].site.line, "branch to an undefined label " + f.second);
      prog_->code[f.first].target = it->second;
    }
    for (auto& in : prog_->code) in.site = Site(prog_->site_file.c_str(), in.site.line);
  }
};

}  // namespace

std::shared_ptr<Program> parse(const std::string& module_text, const std::string& entry) {
  return Parser(module_text, entry).run();
}

std::vector<std::string> entries(const std::string& module_text) {
  std::vector<std::string> names;
  const std::string text = without_comments(module_text);
  size_t pos = 0;
  while ((pos = text.find(".entry", pos)) != std::string::npos) {
    pos += 6;
    while (pos < text.size() && std::isspace(static_cast<unsigned char>(text[pos]))) ++pos;
    size_t end = pos;
    while (end < text.size() && text[end] != '(' && !std::isspace(static_cast<unsigned char>(text[end]))) ++end;
    names.push_back(text.substr(pos, end - pos));
    pos = end;
  }
  return names;
}

}  // namespace ptx
}  // namespace emu
