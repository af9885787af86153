//! A program the kernel refused to load: its whole verifier log goes to a file, and the error
//! names that file and quotes the lines that say why, so a rejection on a user's kernel can be
//! debugged from the error alone.

use std::path::PathBuf;

/// Lines quoted from the end of the log: the failing instruction, the register state before it
/// and the verifier's reason.
const TAIL_LINES: usize = 10;

/// The error detail for a program that failed to load: the syscall error, the first line of the
/// log that matters, its last lines, and where the whole log was written.
pub fn describe_load_error(program: &str, error: &aya::programs::ProgramError) -> String {
    let aya::programs::ProgramError::LoadError { io_error, verifier_log } = error else {
        return error.to_string();
    };
    let log = verifier_log.to_string();
    let saved = match save(program, &log) {
        Ok(path) => format!("whole verifier log ({} lines): {}", log.lines().count(), path.display()),
        Err(e) => format!("the whole verifier log could not be written: {e}"),
    };
    format!("the kernel refused to load it ({io_error}); the verifier said:\n{}\n{saved}", excerpt(&log))
}

/// The log lines that explain a rejection, indented: the first meaningful line, then the last
/// [`TAIL_LINES`] before the closing statistics.
pub fn excerpt(log: &str) -> String {
    let lines: Vec<&str> = log.lines().map(str::trim_end).filter(|l| !l.is_empty() && !is_noise(l)).collect();
    let quoted: Vec<String> = if lines.len() <= TAIL_LINES + 1 {
        lines.iter().map(|l| format!("    {l}")).collect()
    } else {
        let skipped = lines.len() - 1 - TAIL_LINES;
        std::iter::once(format!("    {}", lines[0]))
            .chain(std::iter::once(format!("    ({skipped} lines of the instruction trace are in the file)")))
            .chain(lines[lines.len() - TAIL_LINES..].iter().map(|l| format!("    {l}")))
            .collect()
    };
    if quoted.is_empty() { "    (the kernel gave no verifier log)".to_owned() } else { quoted.join("\n") }
}

/// Lines that say nothing about why a program was refused: the closing statistics, and the
/// notes older kernels print about the BTF of a program's context argument.
fn is_noise(line: &str) -> bool {
    const PREFIXES: &[&str] =
        &["verification time", "stack depth", "processed ", "reg type unsupported for arg#", "func#"];
    PREFIXES.iter().any(|p| line.starts_with(p))
}

fn save(program: &str, log: &str) -> std::io::Result<PathBuf> {
    let name: String = program.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '-' }).collect();
    let path = std::env::temp_dir().join(format!("sonde-verifier-{name}.log"));
    std::fs::write(&path, log)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log Debian 12's 6.1 printed for sonde 0.1's data programs (issue 14), shortened.
    const REJECTED: &str = "reg type unsupported for arg#0 function sys_exit_recvmsg#67
0: R1=ctx(off=0,imm=0) R10=fp0
0: (bf) r6 = r1                       ; R1=ctx(off=0,imm=0) R6_w=ctx(off=0,imm=0)
1: (85) call bpf_get_current_pid_tgid#14      ; R0_w=scalar()
2: (bf) r7 = r0                       ; R0_w=scalar(id=1) R7_w=scalar(id=1)
3: (77) r0 >>= 32                     ; R0_w=scalar(umax=4294967295,var_off=(0x0; 0xffffffff))
4: (bf) r8 = r0
5: (77) r8 >>= 3
6: (63) *(u32 *)(r10 -4) = r8
7: (bf) r2 = r10
8: (07) r2 += -4
9: (18) r1 = 0xffff9d5a4b6c4000
11: (85) call bpf_map_lookup_elem#1
1262: (bf) r1 = r9
1263: (0f) r1 += r8
1264: (85) call bpf_probe_read_user#112
invalid access to map value, value_size=24632 off=16439 size=16383
R1 max value is outside of the allowed memory range
verification time 49551 usec
stack depth 336+0
processed 1883 insns (limit 1000000) max_states_per_insn 3 total_states 152 peak_states 152 mark_read 26
";

    #[test]
    fn excerpt_keeps_the_reason_and_drops_statistics_and_btf_notes() {
        let text = excerpt(REJECTED);
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        assert_eq!(lines[0], "0: R1=ctx(off=0,imm=0) R10=fp0");
        assert_eq!(lines[1], "(6 lines of the instruction trace are in the file)");
        assert_eq!(lines.len(), 2 + TAIL_LINES);
        assert_eq!(lines[lines.len() - 2], "invalid access to map value, value_size=24632 off=16439 size=16383");
        assert_eq!(lines[lines.len() - 1], "R1 max value is outside of the allowed memory range");
        assert!(lines.contains(&"1264: (85) call bpf_probe_read_user#112"));
        assert!(!text.contains("verification time") && !text.contains("processed ") && !text.contains("reg type"));
    }

    #[test]
    fn short_logs_are_quoted_whole() {
        assert_eq!(excerpt("BPF_STX uses reserved fields\n"), "    BPF_STX uses reserved fields");
        assert_eq!(excerpt(""), "    (the kernel gave no verifier log)");
    }
}
