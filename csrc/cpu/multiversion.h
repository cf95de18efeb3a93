// FC_MULTIVERSION: a float function compiled once per x86 ISA level (AVX-512, AVX2, baseline) with
// GCC's target_clones and picked at load time, so one build is fast on every machine (CPU backend).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FC_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FC_MULTIVERSION
#endif
