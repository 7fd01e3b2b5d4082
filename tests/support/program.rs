//! Running real client programs (curl, openssl, python3, fetchmail) to
//! completion, with a hard time limit and their output captured.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{IO_TIMEOUT, require_program};

/// Runs `program` with `args` and `env`, feeding it `input` on stdin (none:
/// no stdin), killing it after twice the harness timeout. Pipes are read on
/// threads, so a chatty child cannot block on them.
pub fn run_with(program: &str, args: &[&str], env: &[(&str, &OsStr)], input: Option<&[u8]>) -> Output {
    let path = require_program(program);
    let mut child = Command::new(&path)
        .args(args)
        .envs(env.iter().copied())
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", path.display()));
    let feeder = input.map(|input| {
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        })
    });
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + IO_TIMEOUT * 2;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program} {args:?} did not finish within {:?}", IO_TIMEOUT * 2);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some(feeder) = feeder {
        let _ = feeder.join();
    }
    Output { status, stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

/// Runs `program` with no stdin (see `run_with`).
pub fn run(program: &str, args: &[&str]) -> Output {
    run_with(program, args, &[], None)
}

/// Exit status and both outputs, for assertion messages.
pub fn describe(output: &Output) -> String {
    format!(
        "exit {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
