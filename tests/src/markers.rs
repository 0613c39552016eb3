//! Reading the `PARVIS-…` markers the guests print.

/// The value after the first `NAME=` marker, up to the end of its line.
pub fn marker<'a>(log: &'a str, name: &str) -> Option<&'a str> {
    marker_all(log, name).into_iter().next()
}

/// Every value of `NAME=` markers, in order. A marker must start its line (after an optional
/// carriage return or kernel timestamp is not allowed: guests print markers alone).
pub fn marker_all<'a>(log: &'a str, name: &str) -> Vec<&'a str> {
    let prefix = format!("{name}=");
    log.lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter_map(|l| l.trim_start_matches('\r').strip_prefix(prefix.as_str()))
        .collect()
}

/// Whether a bare marker line (e.g. `PARVIS-POWEROFF`) appears.
pub fn has_line(log: &str, line: &str) -> bool {
    log.lines().any(|l| l.trim_matches('\r') == line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_markers_on_their_own_lines() {
        let log = "boot\r\nPARVIS-NPROC=2\r\nx PARVIS-NPROC=9\nPARVIS-NPROC=3\nPARVIS-POWEROFF\r\n";
        assert_eq!(marker(log, "PARVIS-NPROC"), Some("2"));
        assert_eq!(marker_all(log, "PARVIS-NPROC"), vec!["2", "3"]);
        assert_eq!(marker(log, "PARVIS-DISK"), None);
        assert!(has_line(log, "PARVIS-POWEROFF"));
        assert!(!has_line(log, "PARVIS-NPROC"));
    }
}
