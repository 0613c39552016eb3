//! Plain helpers that turn numbers and states into words for people, and the little checks
//! the panels share. No drawing.

use proto::v1::{Vm, VmState};

/// Milliseconds since the Unix epoch (the agent's clock for VM state changes).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `1.5 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `1:02:03` or `4 d 01:02`.
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d} d {h:02}:{m:02}")
    } else {
        format!("{h}:{m:02}:{s:02}")
    }
}

pub fn state_word(s: i32) -> &'static str {
    match VmState::try_from(s) {
        Ok(VmState::Off) => "Off",
        Ok(VmState::Starting) => "Starting",
        Ok(VmState::Running) => "Running",
        Ok(VmState::Paused) => "Paused",
        Ok(VmState::Stopping) => "Stopping",
        Ok(VmState::Crashed) => "Crashed",
        _ => "Unknown",
    }
}

/// A VM's name ("" when it has no spec).
pub fn vm_name(v: &Vm) -> &str {
    v.spec.as_ref().map_or("", |s| s.name.as_str())
}

/// Whether `HOST:PORT` names this computer.
pub fn is_loopback(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Serial output for display: UTF-8 (lossy), without terminal escape sequences.
pub fn clean_serial(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    while let Some(&n) = chars.peek() {
                        chars.next();
                        if n.is_ascii_alphabetic() || n == '~' {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c if c.is_control() && c != '\n' && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_for_people() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 29), "1.5 GiB");
        assert_eq!(duration(3723), "1:02:03");
        assert_eq!(duration(2 * 86_400 + 3600), "2 d 01:00");
        assert_eq!(clean_serial(b"a\x1b[1;31mred\x1b[0m\r\nb"), "ared\nb");
        assert!(is_loopback("127.0.0.1:7443"));
        assert!(is_loopback("[::1]:7443"));
        assert!(!is_loopback("10.0.0.1:7443"));
    }
}
