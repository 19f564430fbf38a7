//! QEMU's `key=value,...` option strings, as QemuOpts and keyval both split them:
//! the one splitter every reader of that syntax in this crate uses.

/// Splits `a,b=c,,d` into `["a", "b=c,d"]`: a comma ends an element, and `,,` is a
/// literal comma inside one (QEMU's `get_opt_value`).
pub fn split(spec: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = spec.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                parts.last_mut().expect("never empty").push(',');
            } else {
                parts.push(String::new());
            }
        } else {
            parts.last_mut().expect("never empty").push(c);
        }
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn a_double_comma_is_a_comma() {
        assert_eq!(
            split("socket,path=/a,,b,fd=3"),
            ["socket", "path=/a,b", "fd=3"]
        );
        assert_eq!(split(""), [""]);
        assert_eq!(split("a,"), ["a", ""]);
    }
}
