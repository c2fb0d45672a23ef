//! A stand-in for a CNI's own tc program, to attach after the dataplane's programs on the same
//! hook: a classifier assembled here from raw BPF instructions and loaded with
//! `bpf(BPF_PROG_LOAD)` (no object file, no compiler), which counts the IPv4 UDP packets it sees
//! per destination port in an array map of its own and returns a fixed tc action.
//!
//! It is built by hand rather than taken from the dataplane's object so that it shares nothing
//! with the programs under test (no map, no code path), and so that its action can be chosen:
//! `TC_ACT_UNSPEC` to pass packets on like a well-behaved chained program, `TC_ACT_OK` to end the
//! chain the way the dataplane's programs must not.
//!
//! aya wraps it from a short-lived bpffs pin ([`SchedClassifier::from_pin`]), so that it is
//! attached (TCX link or cls_bpf filter) through the same aya calls as the agent's programs.

use std::{
    ffi::CString,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, Result, bail, ensure};
use aya::programs::SchedClassifier;

use crate::bpfmap::{Attr, bpf};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;

const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_PSEUDO_MAP_FD: u8 = 1;

/// One counter per destination port.
const PORTS: u32 = 1 << 16;

/// `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

// Opcodes (class | size or operation | mode or source).
/// BPF_LD | BPF_ABS | BPF_H: r0 = ntohs(*(u16 *)(skb->data + imm)).
const LD_ABS_H: u8 = 0x28;
/// BPF_LD | BPF_ABS | BPF_B.
const LD_ABS_B: u8 = 0x30;
/// BPF_LD | BPF_IMM | BPF_DW: a 64-bit immediate over two instructions (here a map).
const LD_IMM64: u8 = 0x18;
/// BPF_ALU64 | BPF_MOV | BPF_X.
const MOV64_X: u8 = 0xbf;
/// BPF_ALU64 | BPF_MOV | BPF_K.
const MOV64_K: u8 = 0xb7;
/// BPF_ALU64 | BPF_ADD | BPF_K.
const ADD64_K: u8 = 0x07;
/// BPF_STX | BPF_MEM | BPF_W.
const STX_W: u8 = 0x63;
/// BPF_STX | BPF_ATOMIC | BPF_DW, with imm = BPF_ADD (no fetch).
const ATOMIC_DW: u8 = 0xdb;
const ATOMIC_ADD: i32 = 0x00;
/// BPF_JMP | BPF_JNE | BPF_K.
const JNE_K: u8 = 0x55;
/// BPF_JMP | BPF_JEQ | BPF_K.
const JEQ_K: u8 = 0x15;
/// BPF_JMP | BPF_CALL.
const CALL: u8 = 0x85;
/// BPF_JMP | BPF_EXIT.
const EXIT: u8 = 0x95;

/// The program: `counts[udp dport] += 1` for IPv4 UDP (a 20-byte IPv4 header, as the stack
/// sends), then `return action`. tc programs see the frame from its Ethernet header on both
/// ingress and egress, so the legacy absolute loads read fixed offsets: ethertype at 12, IPv4
/// protocol at 23, UDP destination port at 36 (both converted to host order by the load).
fn instructions(map_fd: i32, action: i32) -> Vec<Insn> {
    // Index of `r0 = action`; a jump's offset counts from the instruction after it.
    let out: i16 = 15;
    let mut p = vec![
        // 0: r6 = r1 (the skb; absolute loads take it from r6)
        insn(MOV64_X, 6, 1, 0, 0),
        // 1: r0 = ethertype
        insn(LD_ABS_H, 0, 0, 0, 12),
        // 2: not IPv4 → out
        insn(JNE_K, 0, 0, out - 3, 0x0800),
        // 3: r0 = IPv4 protocol
        insn(LD_ABS_B, 0, 0, 0, 23),
        // 4: not UDP → out
        insn(JNE_K, 0, 0, out - 5, 17),
        // 5: r0 = UDP destination port
        insn(LD_ABS_H, 0, 0, 0, 36),
        // 6: key (*(u32 *)(r10 - 4)) = r0
        insn(STX_W, 10, 0, -4, 0),
        // 7, 8: r2 = &key
        insn(MOV64_X, 2, 10, 0, 0),
        insn(ADD64_K, 2, 0, 0, -4),
        // 9, 10: r1 = the map
        insn(LD_IMM64, 1, BPF_PSEUDO_MAP_FD, 0, map_fd),
        insn(0, 0, 0, 0, 0),
        // 11: r0 = bpf_map_lookup_elem(r1, r2)
        insn(CALL, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM),
        // 12: no slot → out
        insn(JEQ_K, 0, 0, 2, 0),
        // 13, 14: atomically *(u64 *)r0 += 1
        insn(MOV64_K, 1, 0, 0, 1),
        insn(ATOMIC_DW, 0, 1, 0, ATOMIC_ADD),
    ];
    debug_assert_eq!(p.len(), out as usize);
    // 15, 16: return action
    p.push(insn(MOV64_K, 0, 0, 0, action));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

/// A loaded counting classifier and its per-port counts.
pub struct TcCounter {
    counts: OwnedFd,
    program: SchedClassifier,
}

impl TcCounter {
    /// Loads a counter named `name` (at most 15 characters) that returns `action`. `pins` is a
    /// bpffs directory, where the program is pinned only long enough for aya to open it.
    pub fn load(pins: &Path, name: &str, action: i32) -> Result<TcCounter> {
        crate::require_root();
        ensure!(name.len() < 16, "program name {name:?} longer than 15");
        let counts = create_counts(name)?;
        let insns = instructions(counts.as_raw_fd(), action);
        let program = open(pins, name, &insns)?;
        Ok(TcCounter { counts, program })
    }

    /// The program, to attach (aya detaches what it attached when the counter is dropped).
    pub fn program(&mut self) -> &mut SchedClassifier {
        &mut self.program
    }

    /// The kernel's id of the program (as [`SchedClassifier::query_tcx`] lists it).
    pub fn id(&self) -> Result<u32> {
        Ok(self.program.info()?.id())
    }

    /// IPv4 UDP packets to destination port `port` the program has seen.
    pub fn count(&self, port: u16) -> Result<u64> {
        let key = u32::from(port);
        let mut value = 0u64;
        let mut attr = Attr::new();
        // struct { __u32 map_fd; __aligned_u64 key; __aligned_u64 value; __u64 flags; }
        attr.put_u32(0, self.counts.as_raw_fd() as u32);
        attr.put_u64(8, &key as *const u32 as u64);
        attr.put_u64(16, &mut value as *mut u64 as u64);
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).context("BPF_MAP_LOOKUP_ELEM")?;
        Ok(value)
    }
}

/// A classifier named `name` that does nothing but return `TC_ACT_UNSPEC` ("go on"): two
/// instructions, no map, no helper. Attached at a hook it costs what the hook itself costs (the
/// tc machinery that runs a program), the baseline any tc dataplane pays before its first lookup.
pub fn pass_through(pins: &Path, name: &str) -> Result<SchedClassifier> {
    crate::require_root();
    ensure!(name.len() < 16, "program name {name:?} longer than 15");
    let insns = [
        insn(MOV64_K, 0, 0, 0, crate::testrun::TC_ACT_UNSPEC),
        insn(EXIT, 0, 0, 0, 0),
    ];
    open(pins, name, &insns)
}

/// Loads `insns` as classifier `name` and opens it with aya, through a pin in `pins` that is
/// removed again at once.
fn open(pins: &Path, name: &str, insns: &[Insn]) -> Result<SchedClassifier> {
    let prog = load_program(name, insns)?;
    let pin = pins.join(name);
    let c_pin = CString::new(pin.as_os_str().as_encoded_bytes())?;
    let mut attr = Attr::new();
    // struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }
    attr.put_u64(0, c_pin.as_ptr() as u64);
    attr.put_u32(8, prog.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr).with_context(|| format!("BPF_OBJ_PIN {pin:?}"))?;
    let program = SchedClassifier::from_pin(&pin);
    // aya holds its own descriptor now: the pin is not needed any more.
    std::fs::remove_file(&pin).with_context(|| format!("removing {pin:?}"))?;
    program.with_context(|| format!("opening {pin:?}"))
}

fn put_name(attr: &mut Attr, offset: usize, name: &str) {
    attr.0[offset..offset + name.len()].copy_from_slice(name.as_bytes());
}

fn create_counts(name: &str) -> Result<OwnedFd> {
    let mut attr = Attr::new();
    // struct { u32 map_type, key_size, value_size, max_entries, map_flags, inner_map_fd,
    // numa_node; char map_name[16]; … }
    attr.put_u32(0, BPF_MAP_TYPE_ARRAY);
    attr.put_u32(4, 4);
    attr.put_u32(8, 8);
    attr.put_u32(12, PORTS);
    put_name(&mut attr, 28, name);
    let fd = bpf(BPF_MAP_CREATE, &mut attr).context("BPF_MAP_CREATE (array of counts)")?;
    // SAFETY: BPF_MAP_CREATE returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_PROG_LOAD`; on failure, loads again with the verifier log and reports it.
fn load_program(name: &str, insns: &[Insn]) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 1 << 16];
    for log_level in [0u32, 1] {
        let mut attr = Attr::new();
        // struct { u32 prog_type, insn_cnt; u64 insns, license; u32 log_level, log_size;
        // u64 log_buf; u32 kern_version, prog_flags; char prog_name[16]; … }
        attr.put_u32(0, BPF_PROG_TYPE_SCHED_CLS);
        attr.put_u32(4, insns.len() as u32);
        attr.put_u64(8, insns.as_ptr() as u64);
        attr.put_u64(16, license.as_ptr() as u64);
        if log_level > 0 {
            attr.put_u32(24, log_level);
            attr.put_u32(28, log.len() as u32);
            attr.put_u64(32, log.as_mut_ptr() as u64);
        }
        put_name(&mut attr, 48, name);
        match bpf(BPF_PROG_LOAD, &mut attr) {
            // SAFETY: BPF_PROG_LOAD returned a new descriptor that nothing else owns.
            Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
            Err(e) if log_level > 0 => {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                bail!(
                    "BPF_PROG_LOAD {name}: {e}\n{}",
                    String::from_utf8_lossy(&log[..end])
                );
            }
            Err(_) => {}
        }
    }
    unreachable!("the second attempt returns")
}
