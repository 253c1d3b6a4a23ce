#!/usr/bin/env python3
"""Budgets of the bare-metal back-end, read from its ELF files.

    budgets.py --text-budget N --stack-budget N ELF [ELF ...]

For each ELF (32- or 64-bit little-endian: thumbv7em, aarch64):

- prints the size of every allocated section and checks `.text`;
- if the ELF has a `.stack_sizes` section (built with
  `-Z emit-stack-sizes`), computes the deepest stack from each entry
  function: its frame plus the deepest callee, along the call graph found
  by decoding the direct calls (and tail branches) in `.text`. An
  indirect call or a recursion on the way makes the depth unknown: that
  fails the check. Functions without a `.stack_sizes` entry (the
  precompiled compiler_builtins) get their frame from their prologue.

The entry functions are found by name (`--entry NAME`, a substring of the
mangled symbol); they must not be inlined (`#[inline(never)]`).

Exit status 1 if a budget is exceeded or a measurement fails.
Only the Python standard library is used.
"""
import argparse
import struct
import sys

SHF_ALLOC = 0x2
SHT_SYMTAB = 2
STT_FUNC = 2
EM_ARM = 40
EM_AARCH64 = 183


class Elf:
    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            self.data = f.read()
        d = self.data
        if d[:4] != b"\x7fELF" or d[5] != 1:
            raise SystemExit(f"{path}: not a little-endian ELF file")
        self.is64 = d[4] == 2
        if self.is64:
            (self.machine,) = struct.unpack_from("<H", d, 18)
            shoff, = struct.unpack_from("<Q", d, 40)
            shentsize, shnum, shstrndx = struct.unpack_from("<HHH", d, 58)
        else:
            (self.machine,) = struct.unpack_from("<H", d, 18)
            shoff, = struct.unpack_from("<I", d, 32)
            shentsize, shnum, shstrndx = struct.unpack_from("<HHH", d, 46)
        self.sections = []
        for i in range(shnum):
            off = shoff + i * shentsize
            if self.is64:
                name, typ, flags, addr, offset, size, link, info, align, entsize = \
                    struct.unpack_from("<IIQQQQIIQQ", d, off)
            else:
                name, typ, flags, addr, offset, size, link, info, align, entsize = \
                    struct.unpack_from("<IIIIIIIIII", d, off)
            self.sections.append(dict(name_off=name, type=typ, flags=flags, addr=addr,
                                      offset=offset, size=size, link=link, entsize=entsize))
        strtab = self.sections[shstrndx]
        for s in self.sections:
            s["name"] = self.cstr(strtab["offset"] + s["name_off"])

    def cstr(self, off):
        end = self.data.index(b"\0", off)
        return self.data[off:end].decode("utf-8", "replace")

    def section(self, name):
        for s in self.sections:
            if s["name"] == name:
                return s
        return None

    def symbols(self):
        """(name, value, size, type) of every symbol."""
        out = []
        for s in self.sections:
            if s["type"] != SHT_SYMTAB:
                continue
            strtab = self.sections[s["link"]]
            n = s["size"] // s["entsize"]
            for i in range(n):
                off = s["offset"] + i * s["entsize"]
                if self.is64:
                    name, info, other, shndx, value, size = struct.unpack_from("<IBBHQQ", self.data, off)
                else:
                    name, value, size, info, other, shndx = struct.unpack_from("<IIIBBH", self.data, off)
                out.append((self.cstr(strtab["offset"] + name), value, size, info & 0xF))
        return out


def uleb(data, pos):
    result = shift = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, pos


def sext(v, bits):
    return v - (1 << bits) if v & (1 << (bits - 1)) else v


class Code:
    """The functions of `.text`, their frames and their calls."""

    def __init__(self, elf):
        self.elf = elf
        self.arm = elf.machine == EM_ARM
        if elf.machine not in (EM_ARM, EM_AARCH64):
            raise SystemExit(f"{elf.path}: unsupported machine {elf.machine}")
        text = elf.section(".text")
        self.text = text
        syms = elf.symbols()
        lo, hi = text["addr"], text["addr"] + text["size"]
        self.funcs = {}  # start -> (name, size)
        for name, value, size, typ in syms:
            addr = value & ~1 if self.arm else value
            if typ == STT_FUNC and size and lo <= addr < hi:
                self.funcs.setdefault(addr, (name, size))
        # Mapping symbols: data inside code ($d) and code again ($t / $a / $x).
        self.marks = sorted((value & ~1 if self.arm else value, name[:2])
                            for name, value, size, typ in syms
                            if name[:2] in ("$d", "$t", "$a", "$x") and lo <= (value & ~1) < hi)
        self.frames = {}
        ss = elf.section(".stack_sizes")
        if ss:
            data = elf.data[ss["offset"]:ss["offset"] + ss["size"]]
            width = 8 if elf.is64 else 4
            pos = 0
            while pos < len(data):
                (addr,) = struct.unpack_from("<Q" if elf.is64 else "<I", data, pos)
                size, pos = uleb(data, pos + width)
                self.frames[addr & ~1 if self.arm else addr] = size
        self.has_stack_sizes = ss is not None

    def name(self, addr):
        return self.funcs.get(addr, (hex(addr), 0))[0]

    def find(self, pattern):
        hits = [a for a, (n, _) in self.funcs.items() if pattern in n]
        if len(hits) != 1:
            raise SystemExit(f"{self.elf.path}: {len(hits)} functions match {pattern!r}")
        return hits[0]

    def code_ranges(self, start, size):
        """Parts of [start, start + size) that are code, per mapping symbols."""
        end = start + size
        state = "code"
        before = [m for m in self.marks if m[0] <= start]
        if before and before[-1][1] == "$d":
            state = "data"
        cur = start
        out = []
        for addr, kind in self.marks:
            if addr <= start or addr >= end:
                continue
            if state == "code":
                out.append((cur, addr))
            state = "data" if kind == "$d" else "code"
            cur = addr
        if state == "code":
            out.append((cur, end))
        return out

    def word(self, addr, n):
        off = self.text["offset"] + addr - self.text["addr"]
        return int.from_bytes(self.elf.data[off:off + n], "little")

    def calls(self, start):
        """(direct callees, indirect call sites) of the function at start."""
        name, size = self.funcs[start]
        end = start + size
        callees, indirect = set(), []
        for lo, hi in self.code_ranges(start, size):
            a = lo
            while a < hi:
                if self.arm:
                    hw1 = self.word(a, 2)
                    if hw1 >> 11 in (0b11101, 0b11110, 0b11111) and a + 4 <= hi:
                        hw2 = self.word(a + 2, 2)
                        if hw1 >> 11 == 0b11110 and hw2 & 0x8000:
                            s = (hw1 >> 10) & 1
                            j1, j2 = (hw2 >> 13) & 1, (hw2 >> 11) & 1
                            kind = hw2 & 0xD000
                            if kind in (0xD000, 0xC000, 0x9000):  # BL, BLX, B.W (T4)
                                i1, i2 = 1 - (j1 ^ s), 1 - (j2 ^ s)
                                imm = (s << 24) | (i1 << 23) | (i2 << 22) | ((hw1 & 0x3FF) << 12) | ((hw2 & 0x7FF) << 1)
                                target = (a + 4 + sext(imm, 25)) & ~1
                                if kind == 0xC000:
                                    target &= ~3
                                if kind != 0x9000 or not start <= target < end:
                                    callees.add(target)
                            elif kind == 0x8000 and (hw1 >> 7) & 7 != 7:  # B<c>.W (T3), not MSR/MRS/DMB/...
                                imm = (s << 20) | (j2 << 19) | (j1 << 18) | ((hw1 & 0x3F) << 12) | ((hw2 & 0x7FF) << 1)
                                target = a + 4 + sext(imm, 21)
                                if not start <= target < end:
                                    callees.add(target)
                        a += 4
                        continue
                    if hw1 & 0xFF87 == 0x4780:  # BLX <reg>
                        indirect.append(a)
                    elif hw1 & 0xFF87 == 0x4700 and (hw1 >> 3) & 0xF != 14:  # BX <reg> other than LR
                        indirect.append(a)
                    elif hw1 >> 11 == 0b11100:  # B (T2)
                        target = a + 4 + sext((hw1 & 0x7FF) << 1, 12)
                        if not start <= target < end:
                            callees.add(target)
                    a += 2
                else:
                    w = self.word(a, 4)
                    if w & 0x7C000000 == 0x14000000:  # B / BL
                        target = a + sext((w & 0x3FFFFFF) << 2, 28)
                        if w & 0x80000000 or not start <= target < end:
                            callees.add(target)
                    elif w & 0xFFFFFC1F == 0xD63F0000:  # BLR
                        indirect.append(a)
                    # BR is left to jump tables inside the function.
                    a += 4
        return callees, indirect

    def prologue_frame(self, start):
        """A frame size read from the first instructions (for functions
        built without .stack_sizes): pushes and immediate SP decrements."""
        name, size = self.funcs.get(start, ("?", 32))
        total = 0
        a = start
        end = start + min(size, 40)
        while a < end:
            if self.arm:
                hw = self.word(a, 2)
                if hw & 0xFE00 == 0xB400:  # PUSH {regs[, lr]}
                    total += 4 * (bin(hw & 0xFF).count("1") + ((hw >> 8) & 1))
                elif hw & 0xFF80 == 0xB080:  # SUB SP, #imm7*4
                    total += 4 * (hw & 0x7F)
                elif hw == 0xE92D:  # PUSH.W
                    total += 4 * bin(self.word(a + 2, 2)).count("1")
                elif hw & 0xFFBF == 0xED2D:  # VPUSH
                    total += 4 * (self.word(a + 2, 2) & 0xFF)
                a += 4 if hw >> 11 in (0b11101, 0b11110, 0b11111) else 2
            else:
                w = self.word(a, 4)
                if w & 0xFFC003E0 == 0xA98003E0:  # STP Xt1, Xt2, [SP, #-n]!
                    total += -sext((w >> 15) & 0x7F, 7) * 8
                elif w & 0xFF8003FF == 0xD10003FF:  # SUB SP, SP, #imm{, lsl 12}
                    imm = (w >> 10) & 0xFFF
                    total += imm << 12 if w & 0x400000 else imm
                a += 4
        return total

    def frame(self, addr):
        if addr in self.frames:
            return self.frames[addr], True
        return self.prologue_frame(addr), False

    def deepest(self, entry):
        """(bytes, path, problems): the deepest stack from entry."""
        memo, problems, estimated = {}, [], set()

        def walk(addr, stack):
            if addr in memo:
                return memo[addr]
            if addr in stack:
                problems.append("recursion through " + self.name(addr))
                return 0, []
            if addr not in self.funcs:
                problems.append(f"call to {addr:#x}, not a function start")
                return 0, []
            frame, known = self.frame(addr)
            if not known:
                estimated.add(self.name(addr))
            callees, indirect = self.calls(addr)
            for site in indirect:
                problems.append(f"indirect call in {self.name(addr)} at {site:#x}")
            best, path = 0, []
            for c in sorted(callees):
                d, p = walk(c, stack | {addr})
                if d > best:
                    best, path = d, p
            memo[addr] = (frame + best, [(self.name(addr), frame)] + path)
            return memo[addr]

        total, path = walk(entry, frozenset())
        return total, path, problems, sorted(estimated)


def demangle(name):
    """The readable path of a legacy-mangled Rust symbol (no hash)."""
    if not name.startswith("_ZN"):
        return name
    parts, pos = [], 3
    while pos < len(name) and name[pos].isdigit():
        n = 0
        while name[pos].isdigit():
            n = n * 10 + int(name[pos])
            pos += 1
        parts.append(name[pos:pos + n])
        pos += n
    if parts and parts[-1].startswith("h") and len(parts[-1]) == 17:
        parts.pop()
    s = "::".join(parts)
    for a, b in (("$LT$", "<"), ("$GT$", ">"), ("$u20$", " "), ("$C$", ","), ("..", "::"), ("$RF$", "&")):
        s = s.replace(a, b)
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text-budget", type=int, help="fail if .text is larger")
    ap.add_argument("--text-target", type=int, help="print how far .text is from this")
    ap.add_argument("--stack-budget", type=int, help="fail if a stack is deeper")
    ap.add_argument("--entry", action="append", default=[],
                    help="measure the stack from the function whose symbol contains this")
    ap.add_argument("--no-sections", action="store_true", help="print the stacks only")
    ap.add_argument("elf", nargs="+")
    args = ap.parse_args()
    ok = True
    for path in args.elf:
        elf = Elf(path)
        arch = {EM_ARM: "thumbv7em", EM_AARCH64: "aarch64"}.get(elf.machine, "?")
        print(f"{arch}: {path}")
        if not args.no_sections:
            for s in elf.sections:
                if s["flags"] & SHF_ALLOC:
                    print(f"  {s['name']:<16} {s['size']:>8} B")
            text = elf.section(".text")["size"]
            if args.text_target is not None:
                delta = text - args.text_target
                word = "over" if delta > 0 else "under"
                print(f"  .text is {abs(delta)} B {word} the {args.text_target} B target")
            if args.text_budget is not None:
                verdict = "ok" if text <= args.text_budget else "OVER BUDGET"
                print(f"  .text {text} B, budget {args.text_budget} B: {verdict}")
                ok &= text <= args.text_budget
        if not args.entry:
            continue
        code = Code(elf)
        if not code.has_stack_sizes:
            print("  no .stack_sizes section: build with -Z emit-stack-sizes")
            ok = False
            continue
        for pattern in args.entry:
            total, path, problems, estimated = code.deepest(code.find(pattern))
            within = args.stack_budget is None or total <= args.stack_budget
            verdict = "ok" if within and not problems else "FAILED"
            budget = "" if args.stack_budget is None else f", budget {args.stack_budget} B"
            print(f"  deepest stack from {demangle(code.name(code.find(pattern)))}: {total} B{budget}: {verdict}")
            on_path = {name for name, _ in path}
            for name, frame in path:
                note = "" if name not in estimated else "  (frame read from its prologue)"
                print(f"    {frame:>6} B  {demangle(name)}{note}")
            for p in sorted(set(problems)):
                print(f"    problem: {demangle(p)}")
            ok &= within and not problems
            del on_path
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
