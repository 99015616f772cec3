//! CSV as RFC 4180 says: records end in CRLF; a field holding a comma, a double quote, CR or LF
//! is enclosed in double quotes, with each quote inside doubled. Exports written so open as-is
//! in a spreadsheet.
//!
//! The reader (for the operator's rate table) takes the same grammar, and also LF line ends
//! and a final record without one, since files written by hand have those.

use std::io::{self, Write};

/// Writes one field, quoted when it must be.
pub fn write_field(out: &mut impl Write, field: &str) -> io::Result<()> {
    if field
        .bytes()
        .any(|b| matches!(b, b',' | b'"' | b'\r' | b'\n'))
    {
        out.write_all(b"\"")?;
        for (i, part) in field.split('"').enumerate() {
            if i > 0 {
                out.write_all(b"\"\"")?;
            }
            out.write_all(part.as_bytes())?;
        }
        out.write_all(b"\"")
    } else {
        out.write_all(field.as_bytes())
    }
}

/// Writes one record: fields separated by commas, then CRLF.
pub fn write_record<S: AsRef<str>>(out: &mut impl Write, fields: &[S]) -> io::Result<()> {
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        write_field(out, field.as_ref())?;
    }
    out.write_all(b"\r\n")
}

/// A CSV text that breaks the grammar: the line it starts on, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    pub line: usize,
    pub message: String,
}

/// The records of a CSV text, each with the line it starts on (1-based). Empty lines are
/// skipped.
pub fn read_records(text: &str) -> Result<Vec<(usize, Vec<String>)>, Malformed> {
    let mut records = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while chars.peek().is_some() {
        let start = line;
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut quoted = false;
        let mut was_quoted = false;
        loop {
            let Some(c) = chars.next() else {
                if quoted {
                    return Err(Malformed {
                        line: start,
                        message: "a quoted field is not closed".into(),
                    });
                }
                fields.push(std::mem::take(&mut field));
                break;
            };
            if quoted {
                match c {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    '"' => quoted = false,
                    '\n' => {
                        line += 1;
                        field.push(c);
                    }
                    _ => field.push(c),
                }
                continue;
            }
            match c {
                '"' if field.is_empty() && !was_quoted => {
                    quoted = true;
                    was_quoted = true;
                }
                '"' => {
                    return Err(Malformed {
                        line,
                        message: "a double quote inside an unquoted field (quote the field and double the quote)".into(),
                    });
                }
                ',' => {
                    fields.push(std::mem::take(&mut field));
                    was_quoted = false;
                }
                '\r' if chars.peek() == Some(&'\n') => {}
                '\n' => {
                    line += 1;
                    fields.push(std::mem::take(&mut field));
                    break;
                }
                _ if was_quoted => {
                    return Err(Malformed {
                        line,
                        message: "text after a closing quote".into(),
                    });
                }
                _ => field.push(c),
            }
        }
        if !(fields.len() == 1 && fields.first().is_some_and(String::is_empty) && !was_quoted) {
            records.push((start, fields));
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(fields: &[&str]) -> String {
        let mut out = Vec::new();
        write_record(&mut out, fields).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn quotes_exactly_the_fields_that_need_it() {
        assert_eq!(record(&["a", "b c", ""]), "a,b c,\r\n");
        assert_eq!(record(&["x,y"]), "\"x,y\"\r\n");
        assert_eq!(record(&["say \"hi\""]), "\"say \"\"hi\"\"\"\r\n");
        assert_eq!(record(&["\""]), "\"\"\"\"\r\n");
        assert_eq!(
            record(&["two\nlines", "cr\r"]),
            "\"two\nlines\",\"cr\r\"\r\n"
        );
        assert_eq!(record(&["GET /v1/{city}"]), "GET /v1/{city}\r\n");
    }

    #[test]
    fn what_is_written_reads_back() {
        let fields = [
            "plain",
            "x,y",
            "say \"hi\"",
            "two\r\nlines",
            "",
            "\"",
            "é ü",
        ];
        let text = record(&fields).repeat(2);
        let records = read_records(&text).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].0, 1);
        assert_eq!(records[1].0, 3);
        assert_eq!(records[1].1, fields);
    }

    #[test]
    fn reads_hand_written_files_and_names_the_broken_line() {
        let records = read_records("a,b\nc,d").unwrap();
        assert_eq!(
            records,
            vec![
                (1, vec!["a".into(), "b".into()]),
                (2, vec!["c".into(), "d".into()])
            ]
        );
        assert_eq!(read_records("a\n\n\nb\n").unwrap().len(), 2);
        assert_eq!(read_records("a\nb\"c\n").unwrap_err().line, 2);
        assert_eq!(read_records("a\n\"b\"c\n").unwrap_err().line, 2);
        assert_eq!(read_records("a\n\"open\n").unwrap_err().line, 2);
    }
}
