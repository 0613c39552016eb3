//! The worker's terminal: raw mode for an interactive serial console, restored on exit, and
//! the Ctrl-A x escape that stops the VM.

use std::io::Read;
use std::sync::Mutex;

use rustix::termios::{self, OptionalActions, OutputModes, Termios};

static SAVED: Mutex<Option<Termios>> = Mutex::new(None);

/// Put stdin in raw mode if it is a terminal. Returns whether it did.
pub fn enter_raw_mode() -> bool {
    let stdin = rustix::stdio::stdin();
    if !termios::isatty(stdin) {
        return false;
    }
    let Ok(mut t) = termios::tcgetattr(stdin) else {
        return false;
    };
    let saved = t.clone();
    t.make_raw();
    // Keep output post-processing so the worker's own messages stay readable.
    t.output_modes.insert(OutputModes::OPOST);
    if termios::tcsetattr(stdin, OptionalActions::Now, &t).is_err() {
        return false;
    }
    *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
    true
}

/// Restore the terminal if raw mode was entered.
pub fn restore() {
    if let Some(t) = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = termios::tcsetattr(rustix::stdio::stdin(), OptionalActions::Now, &t);
    }
}

const CTRL_A: u8 = 0x01;

/// Passes input through, except Ctrl-A x (stop) and Ctrl-A Ctrl-A (a literal Ctrl-A).
pub struct EscapeFilter<R, F> {
    inner: R,
    on_stop: F,
    pending_escape: bool,
    stopped: bool,
}

impl<R: Read, F: FnMut()> EscapeFilter<R, F> {
    /// Wrap `inner`; `on_stop` runs on Ctrl-A x.
    pub fn new(inner: R, on_stop: F) -> Self {
        Self {
            inner,
            on_stop,
            pending_escape: false,
            stopped: false,
        }
    }
}

impl<R: Read, F: FnMut()> Read for EscapeFilter<R, F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.stopped {
                return Ok(0);
            }
            let n = self.inner.read(buf)?;
            if n == 0 {
                return Ok(0);
            }
            let mut out = 0;
            for i in 0..n {
                let b = buf[i];
                if self.pending_escape {
                    self.pending_escape = false;
                    match b {
                        b'x' | b'X' => {
                            (self.on_stop)();
                            // Deliver what came before the escape; then end of input.
                            self.stopped = true;
                            return Ok(out);
                        }
                        CTRL_A => {
                            buf[out] = CTRL_A;
                            out += 1;
                        }
                        _ => {}
                    }
                } else if b == CTRL_A {
                    self.pending_escape = true;
                } else {
                    buf[out] = b;
                    out += 1;
                }
            }
            if out > 0 {
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences() {
        let mut stopped = false;
        let mut f = EscapeFilter::new(&b"ab\x01\x01c\x01zd\x01x!"[..], || stopped = true);
        let mut all = Vec::new();
        f.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"ab\x01cd");
        assert!(stopped);
    }
}
