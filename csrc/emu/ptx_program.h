/* The PTX executor's decoded form of one kernel, and its entry points.
 *
 * flash_cuda.emulate(executor="ptx") runs each launch's kernel from the PTX that nvcc emitted
 * for it in the sm_80 build (the very text ptxas turned into the shipped SASS), instead of the
 * kernel source compiled by the host compiler. The text is parsed once per kernel into the
 * Program below (opcodes, types and modifiers resolved to enums, registers to slots, labels to
 * instruction indices, symbols to addresses), so that executing does no string handling. Each
 * emulated thread then interprets the Program on its fiber (ptx_exec.cpp); every memory access,
 * barrier and warp collective goes through the same runtime calls (runtime.h) as the source
 * executor's PTX wrappers, so bounds checks, the race checker, cp.async poisoning, convergence
 * checks and counters apply unchanged. Errors name the PTX line.
 *
 * Semantics: the PTX ISA, https://docs.nvidia.com/cuda/parallel-thread-execution/ (sections
 * cited at each instruction in ptx_exec.cpp). This header is torch-free.
 */
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "runtime.h"

namespace emu {
namespace ptx {

enum class Type : uint8_t {
  none, pred, b8, b16, b32, b64, u8, u16, u32, u64, s8, s16, s32, s64,
  f16, f16x2, bf16, bf16x2, tf32, f32, f64,
};
int type_bits(Type t);
bool is_signed(Type t);
bool is_float(Type t);  // f16, bf16, tf32, f32, f64 (scalars)

enum class Space : uint8_t { generic, global, shared, param, local, constant };

enum class Op : uint8_t {
  mov, add, sub, mul, mad, fma, div, rem, min, max, neg, abs, copysign,
  and_, or_, xor_, not_, shl, shr, bfi, bfe, prmt, popc, clz, brev,
  setp, selp, cvt, cvta,
  ex2, lg2, rcp, sqrt, rsqrt, sin, cos, tanh,
  ld, st, atom, red,
  bra, ret, exit, trap,
  bar_sync, bar_warp_sync, membar,
  shfl,
  mma, ldmatrix, cp_async, cp_async_commit, cp_async_wait_group, cp_async_wait_all,
};
const char* op_name(Op op);

enum class Round : uint8_t { none, rn, rz, rm, rp, rna, rni, rzi, rmi, rpi };
enum class Cmp : uint8_t { eq, ne, lt, le, gt, ge, lo, ls, hi, hs, equ, neu, ltu, leu, gtu, geu, num, nan };
enum class BoolOp : uint8_t { none, and_, or_, xor_ };

// Instruction flags.
enum : uint32_t {
  kFtz = 1u << 0, kSat = 1u << 1, kApprox = 1u << 2, kLo = 1u << 3, kHi = 1u << 4, kWide = 1u << 5,
  kTrans = 1u << 6, kCg = 1u << 7, kFull = 1u << 8, kShiftClamp = 1u << 9, kRelu = 1u << 10,
  kToSpace = 1u << 11,  // cvta.to.<space> (generic -> space); without it cvta.<space> (space -> generic)
};

constexpr uint32_t kNoReg = 0xFFFFFFFFu;

// Special registers (mov from %tid.x etc.).
enum class Special : uint8_t { tid_x, tid_y, tid_z, ntid_x, ntid_y, ntid_z, ctaid_x, ctaid_y, ctaid_z,
                               nctaid_x, nctaid_y, nctaid_z, laneid, warpid, nwarpid, lanemask_lt };

struct Operand {
  enum class Kind : uint8_t { none, reg, imm, addr, vec, special };
  Kind kind = Kind::none;
  bool negate = false;     // !%p as a predicate source
  uint32_t reg = kNoReg;   // reg; addr: base register, or kNoReg for an absolute address
  uint32_t first = 0, count = 0;  // vec: elements Program::vec[first .. first + count)
  int64_t imm = 0;         // imm: the bits; addr: the offset; special: the Special
};

struct Instr {
  Op op = Op::mov;
  Type type = Type::none;   // the instruction type (cvt: destination; mma: accumulator)
  Type type2 = Type::none;  // cvt: source; mma: A/B; setp/selp/bfe etc.: none
  Space space = Space::generic;
  Round round = Round::none;
  Cmp cmp = Cmp::eq;
  BoolOp bop = BoolOp::none;
  uint8_t vec = 1;      // ld/st .v2/.v4
  uint8_t mode = 0;     // shfl: 0 up, 1 down, 2 bfly, 3 idx; ldmatrix: .x1/.x2/.x4; mma: k (8, 16); atom: 0 add
  uint32_t flags = 0;
  uint32_t guard = kNoReg;  // @%p / @!%p
  bool guard_negate = false;
  uint32_t target = 0;      // bra: instruction index
  uint8_t n = 0;            // operands used
  Operand o[6];
  Site site;                // the PTX file and line, for errors and the counters' request keys
  uint8_t cls = 0;          // InstrClass (runtime.h), for Counters::instructions
};

struct Program {
  std::string entry;       // the .entry name (the kernel function's mangled name)
  std::string site_file;   // "<entry>.ptx": what Site::file points to
  size_t param_bytes = 0;  // .param space of the entry
  size_t local_bytes = 0;  // .local variables of the entry (each thread's own frame)
  uint32_t nregs = 0;      // register slots (scoped declarations in inline-asm blocks get their own)
  std::vector<std::string> reg_names;
  std::vector<Type> reg_types;
  std::vector<Instr> code;
  std::vector<Operand> vec;  // elements of vector operands
};

// Parses the entry `entry` of a PTX module. Throws std::invalid_argument naming the line for
// text that is not PTX it can run (an unknown instruction or modifier is an error, not a
// silent no-op).
std::shared_ptr<Program> parse(const std::string& module_text, const std::string& entry);
// Names of the .entry kernels of a module, in order.
std::vector<std::string> entries(const std::string& module_text);

// Runs the calling emulated thread of the current launch through the program.
void run(const Program& program, const void* params, size_t params_bytes);

// Where the PTX of a kernel comes from: given the entry name, its module text (empty if none).
// Set by the extension (ops_emu.cpp) to the Python side (flash_cuda/emulate.py), which reads
// the PTX the build packaged and applies emulate(ptx={...}) replacements.
void set_source_provider(std::function<std::string(const std::string& entry)> provider);
// The parsed program for a kernel function under the PTX executor (cached until the session's
// options change). Throws std::runtime_error when it has no PTX.
std::shared_ptr<const Program> program_for(const std::string& entry);
// The entry with the last true template flag of a kernel's template arguments set to false
// (runtime.h's DenseBatch); entry itself when it has no true flag.
std::string dense_entry(const std::string& entry);
// The mangled symbol name of a kernel function (empty if not found).
std::string symbol_name(const void* kernel_fn);
void clear_cache();

}  // namespace ptx
}  // namespace emu
