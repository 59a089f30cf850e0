//! Rows in PostgreSQL's `COPY … FROM STDIN` text format. The projector streams its append-only
//! tables this way: per row the server does a fraction of the work of `INSERT … SELECT FROM
//! unnest(…)`, which materializes every array before inserting.

use std::io::Write as _;

use chrono::{Datelike as _, Timelike as _};

use sqlx::PgConnection;

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Rows are gathered in chunks of about this size, each sent as it is: the buffers stay small
/// and are reused, where one large buffer would be copied each time it grows, touching fresh
/// memory, and copied once more into the connection's buffer.
const CHUNK_BYTES: usize = 64 * 1024;

/// The rows of one table, field by field: `text` and friends add a field to the current row,
/// `end_row` closes it.
#[derive(Default)]
pub struct CopyRows {
    /// Full chunks, each of whole rows.
    full: Vec<Vec<u8>>,
    /// The chunk being filled.
    data: Vec<u8>,
    row_open: bool,
    rows: usize,
}

impl CopyRows {
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    pub fn text(&mut self, value: &str) -> &mut Self {
        self.separate();
        for byte in value.bytes() {
            match byte {
                b'\\' => self.data.extend_from_slice(b"\\\\"),
                b'\n' => self.data.extend_from_slice(b"\\n"),
                b'\r' => self.data.extend_from_slice(b"\\r"),
                b'\t' => self.data.extend_from_slice(b"\\t"),
                other => self.data.push(other),
            }
        }
        self
    }

    pub fn optional(&mut self, value: Option<&str>) -> &mut Self {
        match value {
            Some(value) => self.text(value),
            None => {
                self.separate();
                self.data.extend_from_slice(b"\\N");
                self
            }
        }
    }

    pub fn int(&mut self, value: i64) -> &mut Self {
        self.separate();
        write!(self.data, "{value}").expect("writing to a Vec never fails");
        self
    }

    /// A `bytea` field, in hex.
    pub fn bytes(&mut self, value: &[u8]) -> &mut Self {
        self.separate();
        self.data.extend_from_slice(b"\\\\x");
        self.data.reserve(value.len() * 2);
        for byte in value {
            self.data.push(HEX_DIGITS[usize::from(byte >> 4)]);
            self.data.push(HEX_DIGITS[usize::from(byte & 0x0f)]);
        }
        self
    }

    /// A `text[]` field.
    pub fn text_array<'a>(&mut self, values: impl IntoIterator<Item = &'a str>) -> &mut Self {
        let mut literal = String::from("{");
        for (n, value) in values.into_iter().enumerate() {
            if n > 0 {
                literal.push(',');
            }
            literal.push('"');
            for c in value.chars() {
                if matches!(c, '"' | '\\') {
                    literal.push('\\');
                }
                literal.push(c);
            }
            literal.push('"');
        }
        literal.push('}');
        self.text(&literal)
    }

    pub fn end_row(&mut self) {
        self.data.push(b'\n');
        self.row_open = false;
        self.rows += 1;
        if self.data.len() >= CHUNK_BYTES {
            let next = Vec::with_capacity(CHUNK_BYTES + CHUNK_BYTES / 4);
            self.full.push(std::mem::replace(&mut self.data, next));
        }
    }

    fn separate(&mut self) {
        if self.row_open {
            self.data.push(b'\t');
        }
        self.row_open = true;
    }

    /// Copies the rows into `target` (`table (column, …)`, in the order of the fields).
    pub async fn write(self, conn: &mut PgConnection, target: &str) -> Result<(), sqlx::Error> {
        if self.is_empty() {
            return Ok(());
        }
        debug_assert!(!self.row_open, "a row was left open");
        let mut copy = conn
            .copy_in_raw(&format!("COPY {target} FROM STDIN"))
            .await?;
        for chunk in self.full.into_iter().chain([self.data]) {
            copy.send(chunk).await?;
        }
        copy.finish().await?;
        Ok(())
    }
}

/// A timestamp field's text: `ms` after the Unix epoch, UTC. `None` outside years 1970–9999.
pub fn timestamp(ms: i64) -> Option<String> {
    const YEAR_10000_MS: i64 = 253_402_300_800_000;
    if !(0..YEAR_10000_MS).contains(&ms) {
        return None;
    }
    let time = chrono::DateTime::from_timestamp_millis(ms)?;
    // Written out field by field: a format string would be parsed again for every row.
    Some(format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03}+00",
        time.year(),
        time.month(),
        time.day(),
        time.hour(),
        time.minute(),
        time.second(),
        ms % 1_000
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_escaped_and_separated() {
        let mut rows = CopyRows::default();
        rows.text("a\tb\\c\nd\re")
            .optional(None)
            .int(-7)
            .bytes(&[0, 255])
            .text_array(["x", "y\"z", "w\\v"]);
        rows.end_row();
        rows.text("second").end_row();
        assert_eq!(
            String::from_utf8(rows.data).unwrap(),
            "a\\tb\\\\c\\nd\\re\t\\N\t-7\t\\\\x00ff\t{\"x\",\"y\\\\\"z\",\"w\\\\\\\\v\"}\nsecond\n"
        );
        assert_eq!(rows.rows, 2);
    }

    #[test]
    fn many_rows_fill_chunks_of_whole_rows_in_order() {
        let mut rows = CopyRows::default();
        let mut expected = String::new();
        for n in 0..50_000 {
            rows.int(n).text("row").end_row();
            expected.push_str(&format!("{n}\trow\n"));
        }
        assert!(rows.full.len() > 2, "{} full chunks", rows.full.len());
        assert!(rows.full.iter().all(|chunk| chunk.ends_with(b"\n")));
        let sent: Vec<u8> = rows.full.concat().into_iter().chain(rows.data).collect();
        assert_eq!(String::from_utf8(sent).unwrap(), expected);
    }

    #[test]
    fn timestamps_are_utc_with_milliseconds() {
        assert_eq!(timestamp(0).unwrap(), "1970-01-01 00:00:00.000+00");
        assert_eq!(
            timestamp(1_764_840_000_123).unwrap(),
            "2025-12-04 09:20:00.123+00"
        );
        assert_eq!(timestamp(-1), None);
        assert_eq!(timestamp(253_402_300_800_000), None);
        assert_eq!(
            timestamp(253_402_300_799_999).unwrap(),
            "9999-12-31 23:59:59.999+00"
        );
    }
}
