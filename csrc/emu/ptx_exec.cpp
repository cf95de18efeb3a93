/* The PTX executor: one emulated thread interprets a decoded Program (ptx_program.h).
 *
 * Registers are 64-bit slots; an instruction reads the low bits its type names and writes its
 * result zero-extended. Each thread runs on its own fiber with its own program counter, so a
 * divergent branch needs nothing special: the lanes meet again at the next collective or
 * barrier, where the runtime checks that every lane of the member mask arrives (and reports
 * the lanes that never do). Memory accesses, collectives and barriers are the runtime calls
 * of the source executor's wrappers (runtime.h), with the PTX line as their site.
 *
 * Address spaces: global (and generic) addresses are host pointers; a shared address is an
 * offset into the block's dynamic shared memory (the only shared variable our kernels have is
 * the extern array, at shared address 0); cvta converts between the two. Param space is the
 * bytes of the kernel's params struct.
 *
 * Checks beyond the runtime's: a value computed from a register that nothing wrote, or from
 * bytes of the thread's .local frame that no store wrote, reaching an address, memory, a branch
 * or a collective (Thread::defined_), integer division by zero, an access to param space past
 * the parameters, shared addresses outside the block's shared memory. Semantics are from the PTX ISA
 * (https://docs.nvidia.com/cuda/parallel-thread-execution/), section named at each case.
 */
#include <dlfcn.h>
#include <cxxabi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ptx_program.h"

namespace emu {
namespace ptx {

namespace {

inline float f32(uint64_t b) {
  const uint32_t u = static_cast<uint32_t>(b);
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint64_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline double f64(uint64_t b) {
  double d;
  std::memcpy(&d, &b, 8);
  return d;
}
inline uint64_t bits(double d) {
  uint64_t u;
  std::memcpy(&u, &d, 8);
  return u;
}
// .ftz: subnormal inputs and results become zero of the same sign (PTX ISA, "Floating Point
// Instructions": subnormal numbers).
inline float flush(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x; }
inline uint64_t trunc(uint64_t v, int nbits) { return nbits >= 64 ? v : v & ((uint64_t(1) << nbits) - 1); }
inline int64_t sext(uint64_t v, int nbits) {
  return nbits >= 64 ? static_cast<int64_t>(v) : static_cast<int64_t>(v << (64 - nbits)) >> (64 - nbits);
}

// 16-bit floats <-> float, by the CUDA headers' host conversions (round to nearest even; what the
// source executor uses too).
inline float half_to_f32(uint16_t h, bool bf16) {
  if (bf16) {
    __nv_bfloat16_raw r;
    r.x = h;
    return __bfloat162float(__nv_bfloat16(r));
  }
  __half_raw r;
  r.x = h;
  return __half2float(__half(r));
}
inline uint16_t f32_to_half(float x, bool bf16) {
  if (bf16) return static_cast<__nv_bfloat16_raw>(__float2bfloat16_rn(x)).x;
  return static_cast<__half_raw>(__float2half_rn(x)).x;
}
inline uint16_t f64_to_half(double x, bool bf16) {
  if (bf16) return static_cast<__nv_bfloat16_raw>(__double2bfloat16(x)).x;
  return static_cast<__half_raw>(__double2half(x)).x;
}

// max/min.f32: NaN only if both are NaN; otherwise the other operand (PTX ISA, max).
// -0.0 < +0.0 for the choice between zeros.
inline float fmax_ptx(float a, float b) {
  if (std::isnan(a)) return std::isnan(b) ? std::numeric_limits<float>::quiet_NaN() : b;
  if (std::isnan(b)) return a;
  if (a == 0.0f && b == 0.0f) return std::signbit(a) ? b : a;
  return a > b ? a : b;
}
inline float fmin_ptx(float a, float b) {
  if (std::isnan(a)) return std::isnan(b) ? std::numeric_limits<float>::quiet_NaN() : b;
  if (std::isnan(b)) return a;
  if (a == 0.0f && b == 0.0f) return std::signbit(a) ? a : b;
  return a < b ? a : b;
}

class Thread {
 public:
  Thread(const Program& p, const char* params, size_t params_bytes)
      : P(p), params_(params), params_bytes_(params_bytes), r_(p.nregs, 0), local_(p.local_bytes, 0), local_written_(p.local_bytes, 0), defined_(p.nregs, 0), origin_(p.nregs) {
    for (uint32_t i = 0; i < p.nregs; ++i) origin_[i] = i;
    smem_ = static_cast<char*>(::emu::dynamic_shared());
    smem_bytes_ = ::emu::dynamic_shared_bytes();
  }

  void run();
  uint64_t executed[6] = {};  // instructions issued, by InstrClass (predicated-off included)

 private:
  const Program& P;
  const char* params_;
  size_t params_bytes_;
  std::vector<uint64_t> r_;
  // Whether a register holds a defined value: written by an instruction none of whose sources
  // was undefined. nvcc's if-conversion computes with registers that a skipped branch would
  // have written (legal: the result is then unused), so reading one is no error; an undefined
  // value reaching an address, memory, a branch or a warp collective is (sink()).
  std::vector<char> local_;  // .local frame
  // Which bytes of the frame a store wrote: a load of others gives an undefined value, tracked
  // like an unwritten register's (a GPU's frame holds whatever the last kernel left there), an
  // error only where it is used (a vector load may cover a partly written struct), per element.
  std::vector<uint8_t> local_written_;
  std::vector<uint8_t> defined_;
  // For an undefined register: the register nothing wrote that its value comes from (itself
  // when nothing wrote it), or P.nregs + the offset of the unwritten .local bytes it was loaded
  // from, so that errors name the root.
  std::vector<uint32_t> origin_;
  bool undef_ = false;  // the current instruction has read an undefined register
  char* smem_;
  size_t smem_bytes_;

  [[noreturn]] void fatal(const Instr& in, const std::string& what) {
    throw std::runtime_error(std::string(in.site.file) + ":" + std::to_string(in.site.line) + ": " + op_name(in.op) +
                             ": " + what);
  }
  void error(const Instr& in, const std::string& what) {
    ::emu::thread_error(std::string(in.site.file) + ":" + std::to_string(in.site.line) + ": " + op_name(in.op) + ": " + what,
                        false);
  }

  uint64_t get(const Operand& o, const Instr& in) {
    switch (o.kind) {
      case Operand::Kind::reg: {
        if (!defined_[o.reg]) {
          if (!undef_) first_undef_ = origin_[o.reg], first_read_ = o.reg;
          undef_ = true;
        }
        const uint64_t v = r_[o.reg];
        return o.negate ? !v : v;
      }
      case Operand::Kind::imm: return static_cast<uint64_t>(o.imm);
      case Operand::Kind::special: return special(static_cast<Special>(o.imm));
      default: fatal(in, "operand is not a value");
    }
  }
  void set(const Operand& o, uint64_t v, const Instr& in) {
    if (o.kind == Operand::Kind::none) return;  // "_" sink
    if (o.kind != Operand::Kind::reg) fatal(in, "destination is not a register");
    r_[o.reg] = v;
    defined_[o.reg] = !undef_;
    if (undef_) origin_[o.reg] = first_undef_;
  }
  uint32_t first_undef_ = 0, first_read_ = 0;
  // An instruction whose effect leaves the thread (memory, control flow, collectives): its
  // operands must be defined. Clears the taint, so that what it loads is defined.
  void sink(const Instr& in, const char* what) {
    if (undef_) {
      const std::string root =
          first_undef_ < P.nregs
              ? "register " + P.reg_names[first_undef_] + ", which no instruction wrote"
              : "the .local frame's bytes at offset " + std::to_string(first_undef_ - P.nregs) + ", which no store wrote";
      const bool through = first_read_ != first_undef_ && first_read_ < P.nregs;
      error(in, std::string(what) + " depends on " + root + (through ? " (through " + P.reg_names[first_read_] + ")" : std::string()));
    }
    undef_ = false;
  }

  uint64_t special(Special s) {
    const Dim3& t = ::emu::thread_idx();
    const Dim3& b = ::emu::block_idx();
    const Dim3& bd = ::emu::block_dim();
    const Dim3& g = ::emu::grid_dim();
    const uint32_t linear = t.x + bd.x * (t.y + bd.y * t.z);
    switch (s) {
      case Special::tid_x: return t.x;
      case Special::tid_y: return t.y;
      case Special::tid_z: return t.z;
      case Special::ntid_x: return bd.x;
      case Special::ntid_y: return bd.y;
      case Special::ntid_z: return bd.z;
      case Special::ctaid_x: return b.x;
      case Special::ctaid_y: return b.y;
      case Special::ctaid_z: return b.z;
      case Special::nctaid_x: return g.x;
      case Special::nctaid_y: return g.y;
      case Special::nctaid_z: return g.z;
      case Special::laneid: return static_cast<uint64_t>(::emu::lane_id());
      case Special::warpid: return linear / 32;
      case Special::nwarpid: return (bd.x * bd.y * bd.z + 31) / 32;
      case Special::lanemask_lt: return (1u << ::emu::lane_id()) - 1;
    }
    return 0;
  }

  // The vector operand's elements (registers or constants) as values / destinations.
  const Operand& elem(const Operand& v, uint32_t i) const { return P.vec[v.first + i]; }

  // ---- memory ----
  char* shared_ptr(uint64_t addr, size_t n, const Instr& in, bool write) {
    if (addr + n > smem_bytes_ || addr + n < addr) {
      std::ostringstream m;
      m << "out-of-bounds shared " << (write ? "write" : "read") << " of " << n << " bytes at shared address " << addr
        << " (dynamic shared memory is " << smem_bytes_ << " bytes)";
      error(in, m.str());
      return nullptr;
    }
    return smem_ + addr;
  }
  bool in_shared_window(uint64_t generic) const {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(smem_);
    return generic >= lo && generic < lo + smem_bytes_;
  }
  Space resolve(Space s, uint64_t* addr) const {
    if (s != Space::generic) return s;
    if (in_shared_window(*addr)) {
      *addr -= reinterpret_cast<uintptr_t>(smem_);
      return Space::shared;
    }
    const uintptr_t p = reinterpret_cast<uintptr_t>(params_);
    if (*addr >= p && *addr < p + params_bytes_) {  // cvta.param'd kernel parameter
      *addr -= p;
      return Space::param;
    }
    return Space::global;
  }
  uint64_t address(const Operand& a, const Instr& in) {
    uint64_t base = a.reg == kNoReg ? 0 : get(Operand{Operand::Kind::reg, false, a.reg}, in);
    if (in.space == Space::shared && a.reg != kNoReg && P.reg_types[a.reg] != Type::b64 &&
        P.reg_types[a.reg] != Type::u64 && P.reg_types[a.reg] != Type::s64)
      base = trunc(base, 32);  // 32-bit shared addresses
    return base + static_cast<uint64_t>(a.imm);
  }

  void load(const Instr& in, void* dst, uint64_t addr, size_t n) {
    const Site s = in.site;
    switch (resolve(in.space, &addr)) {
      case Space::global: ::emu::global_load(dst, reinterpret_cast<const void*>(addr), n, s); return;
      case Space::shared: {
        char* p = shared_ptr(addr, n, in, false);
        if (p) ::emu::shared_load(dst, p, n, s);
        else std::memset(dst, 0, n);
        return;
      }
      case Space::param:
        if (addr > params_bytes_ || n > params_bytes_ - addr)  // (no end formed: it wrapped near 2^64, a review)
          fatal(in, "reads past the kernel's parameters (" + std::to_string(params_bytes_) + " bytes)");
        std::memcpy(dst, params_ + addr, n);
        return;
      case Space::local: std::memcpy(dst, local_ptr(addr, n, in), n); return;  // exec_ld: unwritten bytes
      default: fatal(in, "constant memory is not supported");
    }
  }
  // Local memory: the thread's own frame (no other thread can see it, so no race checks).
  char* local_ptr(uint64_t addr, size_t n, const Instr& in) {
    if (addr > local_.size() || n > local_.size() - addr)
      fatal(in, "local access of " + std::to_string(n) + " bytes at " + std::to_string(addr) + " outside the " +
                    std::to_string(local_.size()) + "-byte frame");
    return local_.data() + addr;
  }
  void store(const Instr& in, const void* src, uint64_t addr, size_t n) {
    const Site s = in.site;
    switch (resolve(in.space, &addr)) {
      case Space::global: ::emu::global_store(reinterpret_cast<void*>(addr), src, n, s); return;
      case Space::shared: {
        char* p = shared_ptr(addr, n, in, true);
        if (p) ::emu::shared_store(p, src, n, s);
        return;
      }
      case Space::local:
        std::memcpy(local_ptr(addr, n, in), src, n);
        std::fill_n(local_written_.begin() + static_cast<std::ptrdiff_t>(addr), n, 1);
        return;
      default: fatal(in, "stores only to global, shared and local memory are supported");
    }
  }

  // PTX ISA, ld/st: the address must be aligned to the access's size (a vector's whole size); a
  // GPU faults ("misaligned address"). Shared, local and param addresses are offsets here, their
  // bases 16-byte aligned, so the offset's alignment is the address's.
  void check_aligned(const Instr& in, uint64_t addr, size_t n) {
    if (addr % n != 0)
      fatal(in, "misaligned address: a " + std::to_string(n) + "-byte access at an address " + std::to_string(addr % n) +
                    " bytes past a multiple of " + std::to_string(n));
  }
  void exec_ld(const Instr& in) {
    const int eb = std::max(1, type_bits(in.type) / 8);
    const size_t n = static_cast<size_t>(eb) * in.vec;
    uint8_t buf[64];
    const uint64_t addr = address(in.o[1], in);
    sink(in, "the address");
    check_aligned(in, addr, n);
    load(in, buf, addr, n);
    const Operand& d = in.o[0];
    for (int i = 0; i < in.vec; ++i) {
      uint64_t v = 0;
      std::memcpy(&v, buf + i * eb, eb);
      if (is_signed(in.type)) v = static_cast<uint64_t>(sext(v, eb * 8));
      // an element of .local bytes no store wrote: its register undefined, the root its first byte
      undef_ = false;
      if (in.space == Space::local) {  // (load() checked the bounds)
        const auto w = local_written_.begin() + static_cast<std::ptrdiff_t>(addr + i * eb);
        const auto unwritten = std::find(w, w + eb, 0);
        undef_ = unwritten != w + eb;
        if (undef_) first_undef_ = first_read_ = P.nregs + static_cast<uint32_t>(unwritten - local_written_.begin());
      }
      set(in.vec == 1 ? d : elem(d, i), v, in);
    }
    undef_ = false;
  }
  void exec_st(const Instr& in) {
    const int eb = std::max(1, type_bits(in.type) / 8);
    const size_t n = static_cast<size_t>(eb) * in.vec;
    uint8_t buf[64];
    const Operand& v = in.o[1];
    for (int i = 0; i < in.vec; ++i) {
      const uint64_t x = get(in.vec == 1 ? v : elem(v, i), in);
      std::memcpy(buf + i * eb, &x, eb);
    }
    const uint64_t addr = address(in.o[0], in);
    sink(in, "the stored value or the address");
    check_aligned(in, addr, n);
    store(in, buf, addr, n);
  }
  // atom/red .add.f32 (PTX ISA, atom): global through the runtime's atomic; shared as a
  // read-modify-write (a block's threads run on one OS thread, one at a time).
  float atomic_add(const Instr& in, uint64_t addr, float v) {
    if (in.type != Type::f32 || in.mode != 0) fatal(in, "only .add.f32 is supported");
    sink(in, "the atomic's value or address");
    switch (resolve(in.space, &addr)) {
      case Space::global: return ::emu::atomic_add_f32(reinterpret_cast<float*>(addr), v, in.site);
      case Space::shared: {
        char* p = shared_ptr(addr, 4, in, true);
        if (!p) return 0.0f;
        float old;
        ::emu::shared_load(&old, p, 4, in.site);
        const float upd = old + v;
        ::emu::shared_store(p, &upd, 4, in.site);
        return old;
      }
      default: fatal(in, "atomics only on global and shared memory");
    }
  }

  // ---- arithmetic ----
  uint64_t int_binary(const Instr& in, uint64_t a, uint64_t b);
  uint64_t float_binary(const Instr& in, uint64_t a, uint64_t b);
  uint64_t convert(const Instr& in, uint64_t a);
  bool compare(const Instr& in, uint64_t a, uint64_t b);
  void exec_mma(const Instr& in);
  void exec_shfl(const Instr& in);
};

uint64_t Thread::int_binary(const Instr& in, uint64_t a, uint64_t b) {
  const int nb = type_bits(in.type);
  const bool sgn = is_signed(in.type);
  if ((in.flags & kSat) && (in.op == Op::add || in.op == Op::sub)) {  // add/sub.sat.s32: clamped, no wrap
    const int64_t x = sext(a, 32), y = sext(b, 32);
    const int64_t r = in.op == Op::add ? x + y : x - y;
    return trunc(static_cast<uint64_t>(std::min<int64_t>(INT32_MAX, std::max<int64_t>(INT32_MIN, r))), 32);
  }
  switch (in.op) {
    case Op::add: return trunc(a + b, nb);
    case Op::sub: return trunc(a - b, nb);
    case Op::mul: {
      // PTX ISA, mul (integer): .lo low half, .hi high half of the 2n-bit product, .wide 2n bits.
      if (in.flags & kWide) {
        if (nb > 32) fatal(in, ".wide is defined for 16- and 32-bit types");
        return sgn ? trunc(static_cast<uint64_t>(sext(a, nb) * sext(b, nb)), 2 * nb)
                   : trunc(trunc(a, nb) * trunc(b, nb), 2 * nb);
      }
      if (in.flags & kHi) {
        if (nb == 64) {
          if (sgn) return static_cast<uint64_t>((static_cast<__int128>(sext(a, 64)) * sext(b, 64)) >> 64);
          return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
        }
        if (sgn) return trunc(static_cast<uint64_t>((sext(a, nb) * sext(b, nb)) >> nb), nb);
        return trunc((trunc(a, nb) * trunc(b, nb)) >> nb, nb);
      }
      return trunc(a * b, nb);
    }
    case Op::div:
    case Op::rem: {
      if (trunc(b, nb) == 0) {
        error(in, "integer division by zero (the PTX ISA leaves the result unspecified)");
        return trunc(~uint64_t(0), nb);
      }
      if (sgn) {
        const int64_t x = sext(a, nb), y = sext(b, nb);
        if (y == -1) return trunc(in.op == Op::div ? static_cast<uint64_t>(0) - static_cast<uint64_t>(x) : 0, nb);  // no overflow trap
        return trunc(static_cast<uint64_t>(in.op == Op::div ? x / y : x % y), nb);
      }
      return in.op == Op::div ? trunc(a, nb) / trunc(b, nb) : trunc(a, nb) % trunc(b, nb);
    }
    case Op::min:
    case Op::max: {
      const bool less = sgn ? sext(a, nb) < sext(b, nb) : trunc(a, nb) < trunc(b, nb);
      return trunc((in.op == Op::min) == less ? a : b, nb);
    }
    case Op::and_: return in.type == Type::pred ? (a && b) : trunc(a & b, nb);
    case Op::or_: return in.type == Type::pred ? (a || b) : trunc(a | b, nb);
    case Op::xor_: return in.type == Type::pred ? ((a != 0) != (b != 0)) : trunc(a ^ b, nb);
    case Op::shl: {
      // PTX ISA, shl/shr: shift amounts greater than the register width are clamped to it.
      const uint64_t s = trunc(b, 32);
      return s >= static_cast<uint64_t>(nb) ? 0 : trunc(a << s, nb);
    }
    case Op::shr: {
      const uint64_t s = std::min<uint64_t>(trunc(b, 32), nb);
      if (sgn) return trunc(static_cast<uint64_t>(sext(a, nb) >> std::min<uint64_t>(s, 63)), nb);
      return s >= static_cast<uint64_t>(nb) ? 0 : trunc(a, nb) >> s;
    }
    default: fatal(in, "not an integer binary operation");
  }
}

uint64_t Thread::float_binary(const Instr& in, uint64_t a, uint64_t b) {
  if (in.type == Type::f64) {
    const double x = f64(a), y = f64(b);
    switch (in.op) {
      case Op::add: return bits(x + y);
      case Op::sub: return bits(x - y);
      case Op::mul: return bits(x * y);
      case Op::div: return bits(x / y);
      case Op::min: return bits(std::isnan(x) ? y : std::isnan(y) ? x : std::min(x, y));
      case Op::max: return bits(std::isnan(x) ? y : std::isnan(y) ? x : std::max(x, y));
      default: fatal(in, "unsupported f64 operation");
    }
  }
  if (in.type == Type::bf16x2 || in.type == Type::f16x2) {
    const bool bf = in.type == Type::bf16x2;
    uint64_t out = 0;
    for (int h = 0; h < 2; ++h) {
      const double x = half_to_f32(static_cast<uint16_t>(a >> (16 * h)), bf), y = half_to_f32(static_cast<uint16_t>(b >> (16 * h)), bf);
      double z;
      switch (in.op) {
        case Op::add: z = x + y; break;
        case Op::sub: z = x - y; break;
        case Op::mul: z = x * y; break;
        case Op::min: z = fmin_ptx(static_cast<float>(x), static_cast<float>(y)); break;
        case Op::max: z = fmax_ptx(static_cast<float>(x), static_cast<float>(y)); break;
        default: fatal(in, "unsupported packed 16-bit operation");
      }
      out |= static_cast<uint64_t>(f64_to_half(z, bf)) << (16 * h);
    }
    return out;
  }
  if (in.type != Type::f32) fatal(in, "unsupported floating-point type");
  const bool ftz = in.flags & kFtz;
  float x = f32(a), y = f32(b), z;
  if (ftz) { x = flush(x); y = flush(y); }
  switch (in.op) {
    case Op::add: z = x + y; break;
    case Op::sub: z = x - y; break;
    case Op::mul: z = x * y; break;
    case Op::div: z = x / y; break;  // .approx: max 2 ulp on the GPU; .full/.rn: IEEE here
    case Op::min: z = fmin_ptx(x, y); break;
    case Op::max: z = fmax_ptx(x, y); break;
    default: fatal(in, "not a floating-point binary operation");
  }
  if (in.flags & kSat) z = std::isnan(z) ? 0.0f : std::min(1.0f, std::max(0.0f, z));
  return bits(ftz ? flush(z) : z);
}

// PTX ISA, cvt: integer <-> integer (truncate / extend by the source's signedness; .sat clamps),
// float <-> float (.rn etc.), float -> integer (.rni/.rzi/.rmi/.rpi, saturating, NaN -> 0),
// integer -> float (.rn).
uint64_t Thread::convert(const Instr& in, uint64_t a) {
  const Type d = in.type, s = in.type2;
  const int db = type_bits(d), sb = type_bits(s);
  const bool ftz = in.flags & kFtz;
  auto source_float = [&]() -> double {
    switch (s) {
      case Type::f32: return ftz ? flush(f32(a)) : f32(a);
      case Type::f64: return f64(a);
      case Type::f16: return half_to_f32(static_cast<uint16_t>(a), false);
      case Type::bf16: return half_to_f32(static_cast<uint16_t>(a), true);
      default: fatal(in, "unsupported source type");
    }
  };
  if (!is_float(d) && !is_float(s) && d != Type::f16x2 && d != Type::bf16x2) {
    // integer to integer
    if (in.flags & kSat) {
      const bool ds = is_signed(d);
      const __int128 v = is_signed(s) ? static_cast<__int128>(sext(a, sb)) : static_cast<__int128>(trunc(a, sb));
      const __int128 lo = ds ? -(static_cast<__int128>(1) << (db - 1)) : 0;
      const __int128 hi = ds ? (static_cast<__int128>(1) << (db - 1)) - 1 : (static_cast<__int128>(1) << db) - 1;
      return trunc(static_cast<uint64_t>(v < lo ? lo : v > hi ? hi : v), db);
    }
    const uint64_t v = is_signed(s) ? static_cast<uint64_t>(sext(a, sb)) : trunc(a, sb);
    return trunc(v, db);
  }
  if (d == Type::tf32) {
    if (s != Type::f32 || in.round != Round::rna) fatal(in, "only cvt.rna.tf32.f32 is supported");
    return ::emu::cvt_rna_tf32(f32(a));
  }
  if (is_float(d) && is_float(s)) {
    const double x = source_float();
    switch (d) {
      case Type::f64: return bits(x);
      case Type::f32: {
        if (s == Type::f64 && in.round != Round::rn && in.round != Round::none) fatal(in, "only .rn from f64");
        float y = static_cast<float>(x);
        if (in.flags & kSat) y = std::isnan(y) ? 0.0f : std::min(1.0f, std::max(0.0f, y));
        return bits(ftz ? flush(y) : y);
      }
      case Type::f16:
      case Type::bf16:
        if (in.round != Round::rn) fatal(in, "only .rn to f16/bf16 is supported");
        return s == Type::f32 ? f32_to_half(static_cast<float>(x), d == Type::bf16) : f64_to_half(x, d == Type::bf16);
      default: fatal(in, "unsupported conversion");
    }
  }
  if (is_float(s)) {  // float -> integer
    double x = source_float();
    if (std::isnan(x)) return 0;
    switch (in.round) {
      case Round::rni: x = std::nearbyint(x); break;  // the host's mode: nearest even
      case Round::rzi: x = std::trunc(x); break;
      case Round::rmi: x = std::floor(x); break;
      case Round::rpi: x = std::ceil(x); break;
      default: fatal(in, "float to integer needs .rni/.rzi/.rmi/.rpi");
    }
    const bool ds = is_signed(d);
    const long double lo = ds ? -std::ldexp(1.0L, db - 1) : 0.0L;
    const long double hi = ds ? std::ldexp(1.0L, db - 1) - 1 : std::ldexp(1.0L, db) - 1;
    const long double v = std::min<long double>(hi, std::max<long double>(lo, x));
    return trunc(ds ? static_cast<uint64_t>(static_cast<int64_t>(v)) : static_cast<uint64_t>(v), db);
  }
  // integer -> float
  if (in.round != Round::rn && in.round != Round::none) fatal(in, "integer to float supports .rn only");
  if (d == Type::f32) return bits(is_signed(s) ? static_cast<float>(sext(a, sb)) : static_cast<float>(trunc(a, sb)));
  if (d == Type::f64) return bits(is_signed(s) ? static_cast<double>(sext(a, sb)) : static_cast<double>(trunc(a, sb)));
  fatal(in, "unsupported conversion");
}

bool Thread::compare(const Instr& in, uint64_t a, uint64_t b) {
  const Type t = in.type;
  if (t == Type::f32 || t == Type::f64) {
    double x, y;
    if (t == Type::f32) {
      float fx = f32(a), fy = f32(b);
      if (in.flags & kFtz) { fx = flush(fx); fy = flush(fy); }
      x = fx;
      y = fy;
    } else {
      x = f64(a);
      y = f64(b);
    }
    const bool unordered = std::isnan(x) || std::isnan(y);
    switch (in.cmp) {
      case Cmp::eq: return !unordered && x == y;
      case Cmp::ne: return !unordered && x != y;
      case Cmp::lt: return !unordered && x < y;
      case Cmp::le: return !unordered && x <= y;
      case Cmp::gt: return !unordered && x > y;
      case Cmp::ge: return !unordered && x >= y;
      case Cmp::equ: return unordered || x == y;
      case Cmp::neu: return unordered || x != y;
      case Cmp::ltu: return unordered || x < y;
      case Cmp::leu: return unordered || x <= y;
      case Cmp::gtu: return unordered || x > y;
      case Cmp::geu: return unordered || x >= y;
      case Cmp::num: return !unordered;
      case Cmp::nan: return unordered;
      default: fatal(in, "integer comparison on floats");
    }
  }
  const int nb = type_bits(t);
  const bool sgn = is_signed(t);
  const int64_t sx = sext(a, nb), sy = sext(b, nb);
  const uint64_t ux = trunc(a, nb), uy = trunc(b, nb);
  switch (in.cmp) {
    case Cmp::eq: return ux == uy;
    case Cmp::ne: return ux != uy;
    case Cmp::lt: return sgn ? sx < sy : ux < uy;
    case Cmp::le: return sgn ? sx <= sy : ux <= uy;
    case Cmp::gt: return sgn ? sx > sy : ux > uy;
    case Cmp::ge: return sgn ? sx >= sy : ux >= uy;
    case Cmp::lo: return ux < uy;
    case Cmp::ls: return ux <= uy;
    case Cmp::hi: return ux > uy;
    case Cmp::hs: return ux >= uy;
    default: fatal(in, "floating-point comparison on integers");
  }
}

// PTX ISA, mma (warp-level matrix multiply-accumulate): the fragments go to the runtime's
// collective, which checks that the whole warp executes it and computes every lane's D.
void Thread::exec_mma(const Instr& in) {
  const Operand &d = in.o[0], &a = in.o[1], &b = in.o[2], &c = in.o[3];
  uint32_t ra[4] = {}, rb[2] = {};
  float rc[4], rd[4];
  const uint32_t na = in.mode == 16 ? 4 : (in.type2 == Type::tf32 ? 4 : 2);
  const uint32_t nbv = in.mode == 16 ? 2 : (in.type2 == Type::tf32 ? 2 : 1);
  if (a.count != na || b.count != nbv || c.count != 4 || d.count != 4) fatal(in, "wrong number of fragment registers");
  for (uint32_t i = 0; i < na; ++i) ra[i] = static_cast<uint32_t>(get(elem(a, i), in));
  for (uint32_t i = 0; i < nbv; ++i) rb[i] = static_cast<uint32_t>(get(elem(b, i), in));
  for (int i = 0; i < 4; ++i) rc[i] = f32(get(elem(c, i), in));
  sink(in, "a fragment");
  if (in.mode == 16) {
    ::emu::mma_m16n8k16(rd, ra, rb, rc, in.type2 == Type::bf16, in.site);
  } else {
    const MmaK8Type t = in.type2 == Type::tf32 ? MmaK8Type::tf32 : in.type2 == Type::bf16 ? MmaK8Type::bf16 : MmaK8Type::f16;
    ::emu::mma_m16n8k8(rd, ra, rb, rc, t, in.site);
  }
  for (int i = 0; i < 4; ++i) set(elem(d, i), bits(rd[i]), in);
}

// PTX ISA, shfl.sync: the runtime moves the value; the optional predicate destination says
// whether the source lane was in range, by the ISA's pseudo-code.
void Thread::exec_shfl(const Instr& in) {
  const bool has_pred = in.flags >> 31;
  const int k = has_pred ? 1 : 0;
  const uint32_t a = static_cast<uint32_t>(get(in.o[1 + k], in));
  const int b = static_cast<int>(get(in.o[2 + k], in));
  const int c = static_cast<int>(get(in.o[3 + k], in));
  const unsigned mask = static_cast<unsigned>(get(in.o[4 + k], in));
  sink(in, "the shuffled value, lane or mask");
  const uint32_t v = ::emu::shfl(in.mode, mask, a, b, c, in.site);
  set(in.o[0], v, in);
  if (has_pred) {
    const int lane = ::emu::lane_id(), bval = b & 0x1f, cval = c & 0x1f, seg = (c >> 8) & 0x1f;
    const int max_lane = (lane & seg) | (cval & ~seg), min_lane = lane & seg;
    bool p;
    switch (in.mode) {
      case 0: p = lane - bval >= max_lane; break;
      case 1: p = lane + bval <= max_lane; break;
      case 2: p = (lane ^ bval) <= max_lane; break;
      default: p = (min_lane | (bval & ~seg)) <= max_lane; break;
    }
    set(in.o[1], p, in);
  }
}

void Thread::run() {
  const Instr* code = P.code.data();
  const size_t ncode = P.code.size();
  const uint64_t limit = ptx_step_limit();
  uint64_t steps = 0;
  size_t pc = 0;
  while (pc < ncode) {
    const Instr& in = code[pc++];
    ++executed[in.cls];
    if (++steps > limit) {
      stop_launch();  // every block would run to the bound too
      fatal(in, "issued more than " + std::to_string(limit) + " instructions in one thread (a loop that never ends? "
                "FLASH_CUDA_PTX_STEP_LIMIT sets the bound)");
    }
    undef_ = false;
    if (in.guard != kNoReg) {
      const bool g = get(Operand{Operand::Kind::reg, false, in.guard}, in) != 0;
      // An undefined guard makes an arithmetic result undefined; an instruction with an effect
      // beyond the thread's registers (every op from ld on) must not depend on one.
      if (in.op >= Op::ld) sink(in, "the guard predicate");
      if (g == in.guard_negate) continue;
    }
    switch (in.op) {
      case Op::mov: {
        const Operand &d = in.o[0], &s = in.o[1];
        if (d.kind == Operand::Kind::vec) {  // unpack: element 0 takes the low bits
          const int eb = type_bits(in.type) / static_cast<int>(d.count);
          const uint64_t v = get(s, in);
          for (uint32_t i = 0; i < d.count; ++i) set(elem(d, i), trunc(v >> (eb * i), eb), in);
        } else if (s.kind == Operand::Kind::vec) {  // pack
          const int eb = type_bits(in.type) / static_cast<int>(s.count);
          uint64_t v = 0;
          for (uint32_t i = 0; i < s.count; ++i) v |= trunc(get(elem(s, i), in), eb) << (eb * i);
          set(d, v, in);
        } else {
          set(d, in.type == Type::pred ? (get(s, in) != 0) : trunc(get(s, in), type_bits(in.type)), in);
        }
        break;
      }
      case Op::add: case Op::sub: case Op::mul: case Op::div: case Op::rem: case Op::min: case Op::max:
      case Op::and_: case Op::or_: case Op::xor_: case Op::shl: case Op::shr: {
        const uint64_t a = get(in.o[1], in), b = get(in.o[2], in);
        const bool fl = is_float(in.type) || in.type == Type::bf16x2 || in.type == Type::f16x2;
        set(in.o[0], fl && in.op != Op::and_ && in.op != Op::or_ && in.op != Op::xor_ ? float_binary(in, a, b) : int_binary(in, a, b), in);
        break;
      }
      case Op::mad:
      case Op::fma: {
        const uint64_t a = get(in.o[1], in), b = get(in.o[2], in), c = get(in.o[3], in);
        if (in.type == Type::f32) {
          float x = f32(a), y = f32(b), z = f32(c);
          const bool ftz = in.flags & kFtz;
          if (ftz) { x = flush(x); y = flush(y); z = flush(z); }
          float r = std::fma(x, y, z);  // .rn: one rounding (mad.f32 is fma on sm_20 and later)
          if (in.flags & kSat) r = std::isnan(r) ? 0.0f : std::min(1.0f, std::max(0.0f, r));
          set(in.o[0], bits(ftz ? flush(r) : r), in);
        } else if (in.type == Type::f64) {
          set(in.o[0], bits(std::fma(f64(a), f64(b), f64(c))), in);
        } else if (in.type == Type::bf16x2 || in.type == Type::f16x2 || in.type == Type::bf16 || in.type == Type::f16) {
          // fma.rn.{f16,bf16}{,x2}: a*b + c rounded once; the product of two 16-bit floats is
          // exact in double, and the sum is rounded by the CUDA headers' double conversion
          // (the source executor's __hfma2).
          const bool bf = in.type == Type::bf16x2 || in.type == Type::bf16;
          const int halves = (in.type == Type::bf16x2 || in.type == Type::f16x2) ? 2 : 1;
          uint64_t out = 0;
          for (int h = 0; h < halves; ++h) {
            const double x = half_to_f32(static_cast<uint16_t>(a >> (16 * h)), bf);
            const double y = half_to_f32(static_cast<uint16_t>(b >> (16 * h)), bf);
            const double z = half_to_f32(static_cast<uint16_t>(c >> (16 * h)), bf);
            double r = x * y + z;
            if (in.flags & kRelu) r = std::isnan(r) ? r : std::max(0.0, r);
            out |= static_cast<uint64_t>(f64_to_half(r, bf)) << (16 * h);
          }
          set(in.o[0], out, in);
        } else {  // integer mad: .lo / .hi / .wide of a*b, plus c
          const int nb = type_bits(in.type);
          Instr mul = in;
          mul.op = Op::mul;
          const uint64_t p = int_binary(mul, a, b);
          set(in.o[0], trunc(p + c, (in.flags & kWide) ? 2 * nb : nb), in);
        }
        break;
      }
      case Op::neg:
      case Op::abs: {
        const uint64_t a = get(in.o[1], in);
        if (in.type == Type::f32) {
          float x = f32(a);
          if (in.flags & kFtz) x = flush(x);
          set(in.o[0], bits(in.op == Op::neg ? -x : std::fabs(x)), in);
        } else if (in.type == Type::f64) {
          set(in.o[0], bits(in.op == Op::neg ? -f64(a) : std::fabs(f64(a))), in);
        } else {
          const int nb = type_bits(in.type);
          const int64_t x = sext(a, nb);
          set(in.o[0], trunc(static_cast<uint64_t>(in.op == Op::neg ? -static_cast<uint64_t>(x) : (x < 0 ? -static_cast<uint64_t>(x) : x)), nb), in);
        }
        break;
      }
      case Op::copysign: {  // copysign.{f32,f64} d, a, b: b's magnitude with a's sign (libdevice's tanhf)
        const uint64_t a = get(in.o[1], in), b = get(in.o[2], in);
        const int nb = type_bits(in.type);
        if (in.type != Type::f32 && in.type != Type::f64) fatal(in, "copysign takes f32 or f64");
        const uint64_t sign = uint64_t(1) << (nb - 1);
        set(in.o[0], (b & (sign - 1)) | (a & sign), in);
        break;
      }
      case Op::not_: {
        const uint64_t a = get(in.o[1], in);
        set(in.o[0], in.type == Type::pred ? !a : trunc(~a, type_bits(in.type)), in);
        break;
      }
      case Op::bfi: {  // PTX ISA, bfi: insert a's low len bits into b at pos
        const int nb = type_bits(in.type);
        const uint64_t a = get(in.o[1], in), b = get(in.o[2], in);
        const uint32_t pos = static_cast<uint32_t>(get(in.o[3], in)) & 0xff, len = static_cast<uint32_t>(get(in.o[4], in)) & 0xff;
        uint64_t f = b;
        for (uint32_t i = 0; i < len && pos + i < static_cast<uint32_t>(nb); ++i)
          f = (f & ~(uint64_t(1) << (pos + i))) | (((a >> i) & 1) << (pos + i));
        set(in.o[0], trunc(f, nb), in);
        break;
      }
      case Op::bfe: {  // PTX ISA, bfe
        const int nb = type_bits(in.type);
        const uint64_t a = get(in.o[1], in);
        const uint32_t pos = static_cast<uint32_t>(get(in.o[2], in)) & 0xff, len = static_cast<uint32_t>(get(in.o[3], in)) & 0xff;
        const uint32_t msb = pos + len - 1;
        uint64_t sbit = 0;
        if (is_signed(in.type) && len != 0) sbit = (a >> std::min<uint32_t>(msb, nb - 1)) & 1;
        uint64_t d = 0;
        for (uint32_t i = 0; i < static_cast<uint32_t>(nb); ++i) {
          const uint64_t bit = (i < len && pos + i < static_cast<uint32_t>(nb)) ? (a >> (pos + i)) & 1 : sbit;
          d |= bit << i;
        }
        set(in.o[0], d, in);
        break;
      }
      case Op::prmt: {  // PTX ISA, prmt (default mode): bytes of {b, a} selected by c's nibbles
        const uint64_t a = get(in.o[1], in), b = get(in.o[2], in), c = get(in.o[3], in);
        const uint64_t both = (trunc(b, 32) << 32) | trunc(a, 32);
        uint32_t d = 0;
        for (int i = 0; i < 4; ++i) {
          const uint32_t sel = (c >> (4 * i)) & 0xf;
          uint32_t byte = (both >> (8 * (sel & 7))) & 0xff;
          if (sel & 8) byte = (byte & 0x80) ? 0xff : 0;
          d |= byte << (8 * i);
        }
        set(in.o[0], d, in);
        break;
      }
      case Op::popc: set(in.o[0], __builtin_popcountll(trunc(get(in.o[1], in), type_bits(in.type))), in); break;
      case Op::clz: {
        const int nb = type_bits(in.type);
        const uint64_t a = trunc(get(in.o[1], in), nb);
        set(in.o[0], a == 0 ? nb : __builtin_clzll(a) - (64 - nb), in);
        break;
      }
      case Op::brev: {
        const int nb = type_bits(in.type);
        const uint64_t a = get(in.o[1], in);
        uint64_t d = 0;
        for (int i = 0; i < nb; ++i) d |= ((a >> i) & 1) << (nb - 1 - i);
        set(in.o[0], d, in);
        break;
      }
      case Op::setp: {
        const bool second = in.flags >> 31;
        const int k = second ? 1 : 0;
        const bool t = compare(in, get(in.o[1 + k], in), get(in.o[2 + k], in));
        bool p = t, q = !t;
        if (in.bop != BoolOp::none) {
          if (in.n < 4 + k) fatal(in, "a combining operation needs a predicate operand c");
          const bool c = get(in.o[3 + k], in) != 0;
          auto comb = [&](bool x) { return in.bop == BoolOp::and_ ? (x && c) : in.bop == BoolOp::or_ ? (x || c) : (x != c); };
          p = comb(t);
          q = comb(!t);
        }
        set(in.o[0], p, in);
        if (second) set(in.o[1], q, in);
        break;
      }
      case Op::selp: {
        const uint64_t c = get(in.o[3], in);
        set(in.o[0], trunc(c ? get(in.o[1], in) : get(in.o[2], in), type_bits(in.type)), in);
        break;
      }
      case Op::cvt: {
        if (in.type == Type::bf16x2 || in.type == Type::f16x2) {
          // cvt.rn{.relu}.{bf16x2,f16x2}.f32 d, a, b: a to the upper half, b to the lower (PTX ISA, cvt)
          if (in.type2 != Type::f32 || in.round != Round::rn) fatal(in, "only cvt.rn.{bf16x2,f16x2}.f32 is supported");
          const bool bf = in.type == Type::bf16x2;
          float hi = f32(get(in.o[1], in)), lo = f32(get(in.o[2], in));
          if (in.flags & kRelu) {
            hi = std::isnan(hi) ? hi : std::max(0.0f, hi);
            lo = std::isnan(lo) ? lo : std::max(0.0f, lo);
          }
          set(in.o[0], (static_cast<uint64_t>(f32_to_half(hi, bf)) << 16) | f32_to_half(lo, bf), in);
        } else {
          set(in.o[0], convert(in, get(in.o[1], in)), in);
        }
        break;
      }
      case Op::cvta: {
        // cvta.to.global: generic and global addresses are the same host pointers here;
        // shared: a generic address is the host pointer into the block's shared memory.
        uint64_t a = get(in.o[1], in);
        if (in.space == Space::shared) a = (in.flags & kToSpace) ? a - reinterpret_cast<uintptr_t>(smem_) : a + reinterpret_cast<uintptr_t>(smem_);
        else if (in.space == Space::param && !(in.flags & kToSpace)) a += reinterpret_cast<uintptr_t>(params_);
        else if (in.space != Space::global) fatal(in, "cvta supports .global, .shared and cvta.param");
        set(in.o[0], trunc(a, type_bits(in.type)), in);
        break;
      }
      case Op::ex2: case Op::lg2: case Op::rcp: case Op::sqrt: case Op::rsqrt: case Op::sin: case Op::cos: case Op::tanh: {
        // .approx on the GPU has a bounded relative error (PTX ISA gives it per instruction); here
        // the host's correctly rounded or libm result, as the source executor's exp2f etc.
        if (in.type != Type::f32) fatal(in, "only .f32 is supported");
        float x = f32(get(in.o[1], in)), y;
        const bool ftz = in.flags & kFtz;
        if (ftz) x = flush(x);
        switch (in.op) {
          case Op::ex2: y = std::exp2(x); break;
          case Op::lg2: y = std::log2(x); break;
          case Op::rcp: y = 1.0f / x; break;
          case Op::sqrt: y = std::sqrt(x); break;
          case Op::rsqrt: y = 1.0f / std::sqrt(x); break;
          case Op::sin: y = std::sin(x); break;
          case Op::cos: y = std::cos(x); break;
          default: y = std::tanh(x); break;
        }
        set(in.o[0], bits(ftz ? flush(y) : y), in);
        break;
      }
      case Op::ld: exec_ld(in); break;
      case Op::st: exec_st(in); break;
      case Op::atom: set(in.o[0], bits(atomic_add(in, address(in.o[1], in), f32(get(in.o[2], in)))), in); break;
      case Op::red: atomic_add(in, address(in.o[0], in), f32(get(in.o[1], in))); break;
      case Op::bra: pc = in.target; break;  // (a guard was checked above)
      case Op::ret: case Op::exit: return;
      case Op::trap: ::emu::trap(in.site); return;
      case Op::bar_sync:
        if (in.n < 1 || in.o[0].kind != Operand::Kind::imm || in.o[0].imm != 0 || in.n > 1)
          fatal(in, "only bar.sync 0 (all threads of the block) is supported");
        ::emu::syncthreads(in.site);
        break;
      case Op::bar_warp_sync: {
        const unsigned mask = static_cast<unsigned>(get(in.o[0], in));
        sink(in, "the member mask");
        ::emu::syncwarp(mask, in.site);
        break;
      }
      case Op::membar: break;  // the emulator's memory is sequentially consistent
      case Op::shfl: exec_shfl(in); break;
      case Op::mma: exec_mma(in); break;
      case Op::ldmatrix: {  // PTX ISA, ldmatrix: lanes give row addresses; the runtime's collective
        const uint64_t a = address(in.o[1], in);
        sink(in, "the row address");
        // lanes 8m..8m+7 give matrix m's rows (the others' addresses are unused): one outside the
        // block's shared memory is reported here, at the address the kernel computed
        const bool row_lane = ::emu::lane_id() < 8 * in.mode;
        const char* p = row_lane ? shared_ptr(a, 16, in, false) : smem_;
        if (!p) p = ::emu::kReportedRow;
        uint32_t rr[4];
        const Operand& d = in.o[0];
        if (d.count != in.mode) fatal(in, "wrong number of destination registers");
        ::emu::ldmatrix(rr, in.mode, in.flags & kTrans, p, in.site);
        for (uint32_t i = 0; i < d.count; ++i) set(elem(d, i), rr[i], in);
        break;
      }
      case Op::cp_async: {  // PTX ISA, cp.async: [dst], [src], cp-size{, src-size | ignore-src}
        const uint64_t dst = address(in.o[0], in), src = address(in.o[1], in);
        const int cp_size = static_cast<int>(get(in.o[2], in));
        int src_size = cp_size;
        if (in.n == 4) {
          const Operand& x = in.o[3];
          if (x.kind == Operand::Kind::reg && P.reg_types[x.reg] == Type::pred) src_size = get(x, in) ? 0 : cp_size;
          else src_size = static_cast<int>(get(x, in));
        }
        sink(in, "the addresses or the source size");
        char* p = shared_ptr(dst, cp_size, in, true);
        if (!p) break;
        ::emu::cp_async(p, reinterpret_cast<const void*>(src), cp_size, src_size, in.flags & kCg, in.site);
        break;
      }
      case Op::cp_async_commit: ::emu::cp_async_commit(); break;
      case Op::cp_async_wait_group: ::emu::cp_async_wait_group(static_cast<int>(in.o[0].imm), in.site); break;
      case Op::cp_async_wait_all: ::emu::cp_async_wait_all(in.site); break;
      default: fatal(in, "not implemented");
    }
  }
}

// ---- the session's programs ----
// Function-local statics: the extension sets the provider from another file's static
// initialiser, which may run before this file's globals would be constructed.
struct Session {
  std::mutex mutex;
  std::function<std::string(const std::string&)> provider;
  std::unordered_map<std::string, std::shared_ptr<const Program>> cache;
};
Session& session() {
  static Session s;
  return s;
}

}  // namespace

void run(const Program& program, const void* params, size_t params_bytes) {
  if (params_bytes != program.param_bytes)
    throw std::runtime_error("PTX entry " + program.entry + " takes " + std::to_string(program.param_bytes) +
                             " bytes of parameters; the launch passes " + std::to_string(params_bytes));
  Thread t(program, static_cast<const char*>(params), params_bytes);
  t.run();
  ::emu::add_instructions(t.executed);
}

void set_source_provider(std::function<std::string(const std::string&)> provider) {
  std::lock_guard<std::mutex> g(session().mutex);
  session().provider = std::move(provider);
}

void clear_cache() {
  std::lock_guard<std::mutex> g(session().mutex);
  session().cache.clear();
}

std::string symbol_name(const void* kernel_fn) {
  Dl_info info;
  if (kernel_fn == nullptr || dladdr(kernel_fn, &info) == 0 || info.dli_sname == nullptr) return "";
  if (info.dli_saddr != kernel_fn) return "";
  return info.dli_sname;
}

std::string dense_entry(const std::string& entry) {
  // A function template specialisation in a namespace mangles as _ZN...I<args>EEv<params>: its
  // trailing bool arguments are the tokens Lb0E / Lb1E just before "EEv".
  const size_t end = entry.rfind("EEv");
  if (end == std::string::npos) return entry;
  size_t pos = end;
  while (pos >= 4 && (entry.compare(pos - 4, 4, "Lb0E") == 0 || entry.compare(pos - 4, 4, "Lb1E") == 0)) {
    pos -= 4;
    if (entry[pos + 2] == '1') {
      std::string dense = entry;
      dense[pos + 2] = '0';
      return dense;
    }
  }
  return entry;
}

std::shared_ptr<const Program> program_for(const std::string& entry) {
  std::function<std::string(const std::string&)> provider;
  {
    std::lock_guard<std::mutex> g(session().mutex);
    auto it = session().cache.find(entry);
    if (it != session().cache.end()) return it->second;
    provider = session().provider;
  }
  if (!provider) throw std::runtime_error("PTX executor: no PTX source is configured");
  const std::string text = provider(entry);
  if (text.empty()) {
    int status = 0;
    char* dem = abi::__cxa_demangle(entry.c_str(), nullptr, nullptr, &status);
    const std::string readable = status == 0 && dem ? dem : entry;
    std::free(dem);
    throw std::runtime_error("PTX executor: this build has no PTX for " + readable +
                             " (the sm_80 PTX is packaged when the extension is built with nvcc and "
                             "TORCH_CUDA_ARCH_LIST containing 8.0)");
  }
  std::shared_ptr<const Program> prog;
  try {
    prog = parse(text, entry);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string("PTX of ") + entry + ": " + e.what());
  }
  std::lock_guard<std::mutex> g(session().mutex);
  return session().cache.emplace(entry, prog).first->second;
}

}  // namespace ptx
}  // namespace emu
