//! Keys to PC scan codes (set 1 make codes; `0xE0xx` for extended keys), by physical
//! position: the guest applies its own keyboard layout, so a German or French user gets
//! their own characters, as with a real keyboard.

use egui::Key;

/// The scan code of the key at this physical position (egui names positions after the US
/// layout), or `None` for keys a PC keyboard does not have.
pub fn scancode(key: Key) -> Option<u32> {
    use Key::*;
    Some(match key {
        Escape => 0x01,
        Num1 => 0x02,
        Num2 => 0x03,
        Num3 => 0x04,
        Num4 => 0x05,
        Num5 => 0x06,
        Num6 => 0x07,
        Num7 => 0x08,
        Num8 => 0x09,
        Num9 => 0x0a,
        Num0 => 0x0b,
        Minus => 0x0c,
        Equals | Plus => 0x0d,
        Backspace => 0x0e,
        Tab => 0x0f,
        Q => 0x10,
        W => 0x11,
        E => 0x12,
        R => 0x13,
        T => 0x14,
        Y => 0x15,
        U => 0x16,
        I => 0x17,
        O => 0x18,
        P => 0x19,
        OpenBracket | OpenCurlyBracket => 0x1a,
        CloseBracket | CloseCurlyBracket => 0x1b,
        Enter => 0x1c,
        ControlLeft => 0x1d,
        A => 0x1e,
        S => 0x1f,
        D => 0x20,
        F => 0x21,
        G => 0x22,
        H => 0x23,
        J => 0x24,
        K => 0x25,
        L => 0x26,
        Semicolon | Colon => 0x27,
        Quote => 0x28,
        Backtick => 0x29,
        ShiftLeft => 0x2a,
        Backslash | Pipe => 0x2b,
        Z => 0x2c,
        X => 0x2d,
        C => 0x2e,
        V => 0x2f,
        B => 0x30,
        N => 0x31,
        M => 0x32,
        Comma => 0x33,
        Period => 0x34,
        Slash | Questionmark => 0x35,
        ShiftRight => 0x36,
        AltLeft => 0x38,
        Space => 0x39,
        CapsLock => 0x3a,
        F1 => 0x3b,
        F2 => 0x3c,
        F3 => 0x3d,
        F4 => 0x3e,
        F5 => 0x3f,
        F6 => 0x40,
        F7 => 0x41,
        F8 => 0x42,
        F9 => 0x43,
        F10 => 0x44,
        NumLock => 0x45,
        ScrollLock => 0x46,
        IntlBackslash => 0x56,
        F11 => 0x57,
        F12 => 0x58,
        ControlRight => 0xe01d,
        AltRight => 0xe038,
        Home => 0xe047,
        ArrowUp => 0xe048,
        PageUp => 0xe049,
        ArrowLeft => 0xe04b,
        ArrowRight => 0xe04d,
        End => 0xe04f,
        ArrowDown => 0xe050,
        PageDown => 0xe051,
        Insert => 0xe052,
        Delete => 0xe053,
        SuperLeft => 0xe05b,
        SuperRight => 0xe05c,
        Menu => 0xe05d,
        PrintScreen => 0xe037,
        _ => return None,
    })
}

pub const LEFT_CTRL: u32 = 0x1d;
pub const LEFT_ALT: u32 = 0x38;
pub const LEFT_SHIFT: u32 = 0x2a;
pub const DELETE: u32 = 0xe053;
pub const BACKSPACE: u32 = 0x0e;
/// SysRq: the PrintScreen key while Alt is held (set 1: 0x54).
pub const SYSRQ: u32 = 0x54;

/// Scan codes of F1..=F12.
pub fn function_key(n: u8) -> Option<u32> {
    match n {
        1..=10 => Some(0x3a + u32::from(n)),
        11 => Some(0x57),
        12 => Some(0x58),
        _ => None,
    }
}

/// How to type `c` on a US keyboard: (scan code, shift). `None` for characters it cannot
/// type (the guest is assumed to use the US layout for typed text).
pub fn char_key(c: char) -> Option<(u32, bool)> {
    const ROW: &[(char, char, u32)] = &[
        ('1', '!', 0x02),
        ('2', '@', 0x03),
        ('3', '#', 0x04),
        ('4', '$', 0x05),
        ('5', '%', 0x06),
        ('6', '^', 0x07),
        ('7', '&', 0x08),
        ('8', '*', 0x09),
        ('9', '(', 0x0a),
        ('0', ')', 0x0b),
        ('-', '_', 0x0c),
        ('=', '+', 0x0d),
        ('[', '{', 0x1a),
        (']', '}', 0x1b),
        (';', ':', 0x27),
        ('\'', '"', 0x28),
        ('`', '~', 0x29),
        ('\\', '|', 0x2b),
        (',', '<', 0x33),
        ('.', '>', 0x34),
        ('/', '?', 0x35),
    ];
    const LETTERS: &[u8; 26] = &[
        0x1e, 0x30, 0x2e, 0x20, 0x12, 0x21, 0x22, 0x23, 0x17, 0x24, 0x25, 0x26, 0x32, 0x31, 0x18,
        0x19, 0x10, 0x13, 0x1f, 0x14, 0x16, 0x2f, 0x11, 0x2d, 0x15, 0x2c,
    ];
    match c {
        'a'..='z' => Some((u32::from(LETTERS[(c as u8 - b'a') as usize]), false)),
        'A'..='Z' => Some((u32::from(LETTERS[(c as u8 - b'A') as usize]), true)),
        ' ' => Some((0x39, false)),
        '\n' => Some((0x1c, false)),
        '\t' => Some((0x0f, false)),
        _ => ROW.iter().find_map(|&(plain, shifted, code)| {
            if c == plain {
                Some((code, false))
            } else if c == shifted {
                Some((code, true))
            } else {
                None
            }
        }),
    }
}

/// The key presses and releases that type `text`: (scan code, pressed). Returns them and
/// how many characters could not be typed.
pub fn type_text(text: &str) -> (Vec<(u32, bool)>, usize) {
    let mut out = Vec::new();
    let mut skipped = 0;
    for c in text.chars() {
        if c == '\r' {
            continue;
        }
        let Some((code, shift)) = char_key(c) else {
            skipped += 1;
            continue;
        };
        if shift {
            out.push((LEFT_SHIFT, true));
        }
        out.push((code, true));
        out.push((code, false));
        if shift {
            out.push((LEFT_SHIFT, false));
        }
    }
    (out, skipped)
}

/// A key chord: every key pressed in order, then released in reverse.
pub fn chord(keys: &[u32]) -> Vec<(u32, bool)> {
    keys.iter()
        .map(|&k| (k, true))
        .chain(keys.iter().rev().map(|&k| (k, false)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn physical_positions_and_typing() {
        assert_eq!(scancode(Key::A), Some(0x1e));
        assert_eq!(scancode(Key::ArrowUp), Some(0xe048));
        assert_eq!(scancode(Key::CapsLock), Some(0x3a));
        assert_eq!(scancode(Key::F35), None);
        assert_eq!(function_key(1), Some(0x3b));
        assert_eq!(function_key(12), Some(0x58));
        let (keys, skipped) = type_text("aB!é");
        assert_eq!(skipped, 1);
        assert_eq!(
            keys,
            vec![
                (0x1e, true),
                (0x1e, false),
                (0x2a, true),
                (0x30, true),
                (0x30, false),
                (0x2a, false),
                (0x2a, true),
                (0x02, true),
                (0x02, false),
                (0x2a, false),
            ]
        );
        assert_eq!(
            chord(&[LEFT_CTRL, LEFT_ALT, DELETE]),
            vec![
                (0x1d, true),
                (0x38, true),
                (0xe053, true),
                (0xe053, false),
                (0x38, false),
                (0x1d, false)
            ]
        );
    }
}
