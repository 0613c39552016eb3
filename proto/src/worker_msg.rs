//! Building `parvis.worker.v1` messages that the worker and its stand-ins (the tests'
//! `fake-worker`) both send.

use crate::worker::{BootRows, DisplayUpdate, Error, ErrorCode, Rect, display_update};

/// The update carrying `rows` (`(y, height)` each) of a `width`-pixel boot framebuffer, as
/// full-width rectangles.
pub fn boot_rows(rows: impl IntoIterator<Item = (u32, u32)>, width: u32) -> DisplayUpdate {
    DisplayUpdate {
        kind: Some(display_update::Kind::BootRows(BootRows {
            rows: rows
                .into_iter()
                .map(|(y, height)| Rect {
                    x: 0,
                    y,
                    width,
                    height,
                })
                .collect(),
        })),
    }
}

impl Error {
    /// An error with `code` and words for a person.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            code: code as i32,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_rows_are_full_width() {
        let u = boot_rows([(0, 2), (10, 1)], 640);
        let Some(display_update::Kind::BootRows(b)) = u.kind else {
            panic!("{u:?}");
        };
        assert_eq!(
            b.rows,
            vec![
                Rect {
                    x: 0,
                    y: 0,
                    width: 640,
                    height: 2
                },
                Rect {
                    x: 0,
                    y: 10,
                    width: 640,
                    height: 1
                }
            ]
        );
        let e = Error::new(ErrorCode::Gone, "the partition has ended");
        assert_eq!(e.code(), ErrorCode::Gone);
    }
}
