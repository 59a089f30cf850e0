//! Rows in PostgreSQL's binary `COPY … FROM STDIN` format. The projector streams its append-only
//! tables this way: per row the server does a fraction of the work of `INSERT … SELECT FROM
//! unnest(…)`, which materializes every array before inserting, and in the binary format it
//! parses no text (numbers, times and byte strings arrive as the server stores them).
//!
//! Each field is written as the column's type expects it (`int4` for an `integer` column,
//! `int8` for a `bigint` one, …): the server checks only the length.

use sqlx::PgConnection;
use sqlx::postgres::PgCopyIn;
use tokio::sync::mpsc;

/// Rows are gathered in chunks of about this size, each sent as it is: the buffers stay small
/// and are reused, where one large buffer would be copied each time it grows, touching fresh
/// memory, and copied once more into the connection's buffer.
const CHUNK_BYTES: usize = 64 * 1024;

/// The binary format's signature, flags (none) and header extension length (none).
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The field count that ends the data.
const TRAILER: &[u8] = &(-1i16).to_be_bytes();

/// The type of an array's elements: `text`.
const TEXT_OID: u32 = 25;

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00 UTC).
const POSTGRES_EPOCH_US: i64 = 946_684_800_000_000;

/// Where rows are copied: a table (in the connection's `search_path`) and the columns each row
/// gives, in the order of its fields.
pub struct Target {
    pub table: &'static str,
    /// `(column, …)`
    pub columns: &'static str,
}

/// The rows of one table, field by field: `text` and friends add a field to the current row,
/// `end_row` closes it.
#[derive(Default)]
pub struct CopyRows {
    /// Full chunks, each of whole rows.
    full: Vec<Vec<u8>>,
    /// The chunk being filled.
    data: Vec<u8>,
    /// Where the open row's field count is, and its fields so far.
    row: Option<(usize, i16)>,
    rows: usize,
}

impl CopyRows {
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    pub fn text(&mut self, value: &str) -> &mut Self {
        self.bytes(value.as_bytes())
    }

    pub fn optional(&mut self, value: Option<&str>) -> &mut Self {
        match value {
            Some(value) => self.text(value),
            None => self.field(-1),
        }
    }

    /// An `integer` field.
    pub fn int4(&mut self, value: i32) -> &mut Self {
        self.field(4).data.extend_from_slice(&value.to_be_bytes());
        self
    }

    /// A `bigint` field.
    pub fn int8(&mut self, value: i64) -> &mut Self {
        self.field(8).data.extend_from_slice(&value.to_be_bytes());
        self
    }

    /// A `boolean` field.
    pub fn boolean(&mut self, value: bool) -> &mut Self {
        self.field(1).data.push(u8::from(value));
        self
    }

    /// A `bytea` field (or the bytes of a `text` one).
    pub fn bytes(&mut self, value: &[u8]) -> &mut Self {
        self.field(length(value.len()))
            .data
            .extend_from_slice(value);
        self
    }

    /// A `timestamptz` field, `ms` after the Unix epoch (see [`timestamp_in_range`]).
    pub fn timestamp(&mut self, ms: i64) -> &mut Self {
        self.int8(ms * 1_000 - POSTGRES_EPOCH_US)
    }

    /// A `numeric` field holding an integer: its base-10000 digits, most significant first,
    /// without the trailing zero digits (the weight keeps their place).
    pub fn numeric(&mut self, value: i128) -> &mut Self {
        let mut digits = [0u16; 10];
        let mut count = 0;
        let mut rest = value.unsigned_abs();
        while rest > 0 {
            digits[count] = (rest % 10_000) as u16;
            rest /= 10_000;
            count += 1;
        }
        let lowest = digits[..count].iter().take_while(|d| **d == 0).count();
        let kept = &digits[lowest..count];
        let weight = count.saturating_sub(1) as i16;
        let sign: u16 = if value < 0 { 0x4000 } else { 0 };
        self.field(8 + 2 * kept.len() as i32);
        for half in [kept.len() as u16, weight as u16, sign, 0] {
            self.data.extend_from_slice(&half.to_be_bytes());
        }
        for digit in kept.iter().rev() {
            self.data.extend_from_slice(&digit.to_be_bytes());
        }
        self
    }

    /// A `jsonb` field from its JSON text.
    pub fn jsonb(&mut self, json: &str) -> &mut Self {
        self.field(length(json.len() + 1)).data.push(1);
        self.data.extend_from_slice(json.as_bytes());
        self
    }

    /// A `text[]` field (one dimension, from 1, no nulls).
    pub fn text_array<'a>(&mut self, values: impl IntoIterator<Item = &'a str>) -> &mut Self {
        let values: Vec<&str> = values.into_iter().collect();
        let header = if values.is_empty() { 12 } else { 20 };
        let size: usize = header + values.iter().map(|v| 4 + v.len()).sum::<usize>();
        self.field(length(size));
        let dimensions: &[i32] = if values.is_empty() {
            &[0, 0, TEXT_OID as i32]
        } else {
            &[1, 0, TEXT_OID as i32, values.len() as i32, 1]
        };
        for word in dimensions {
            self.data.extend_from_slice(&word.to_be_bytes());
        }
        for value in values {
            self.data
                .extend_from_slice(&length(value.len()).to_be_bytes());
            self.data.extend_from_slice(value.as_bytes());
        }
        self
    }

    pub fn end_row(&mut self) {
        let (at, fields) = self.row.take().expect("a row has at least one field");
        self.data[at..at + 2].copy_from_slice(&fields.to_be_bytes());
        self.rows += 1;
        if self.data.len() >= CHUNK_BYTES {
            let next = Vec::with_capacity(CHUNK_BYTES + CHUNK_BYTES / 4);
            self.full.push(std::mem::replace(&mut self.data, next));
        }
    }

    /// Starts a field of `length` bytes (-1: null), and the row if it is the first.
    fn field(&mut self, length: i32) -> &mut Self {
        let (_, fields) = self.row.get_or_insert_with(|| {
            let at = self.data.len();
            self.data.extend_from_slice(&[0, 0]);
            (at, 0)
        });
        *fields += 1;
        self.data.extend_from_slice(&length.to_be_bytes());
        self
    }

    /// Copies the rows into `target`.
    pub async fn write(self, conn: &mut PgConnection, target: &Target) -> Result<(), sqlx::Error> {
        if self.is_empty() {
            return Ok(());
        }
        let mut copy = start(conn, target).await?;
        self.send(&mut copy).await?;
        finish(copy).await
    }

    async fn send(self, copy: &mut PgCopyIn<&mut PgConnection>) -> Result<(), sqlx::Error> {
        debug_assert!(self.row.is_none(), "a row was left open");
        for chunk in self.full.into_iter().chain([self.data]) {
            copy.send(chunk).await?;
        }
        Ok(())
    }
}

/// Copies every batch of rows that `batches` brings into `target`, in one `COPY` (a bulk load:
/// the server's cost of starting and ending a `COPY` grows with the rows it buffers at once).
pub async fn stream(
    conn: &mut PgConnection,
    target: &Target,
    mut batches: mpsc::Receiver<CopyRows>,
) -> Result<(), sqlx::Error> {
    let mut copy = start(conn, target).await?;
    while let Some(rows) = batches.recv().await {
        rows.send(&mut copy).await?;
    }
    finish(copy).await
}

async fn start<'c>(
    conn: &'c mut PgConnection,
    target: &Target,
) -> Result<PgCopyIn<&'c mut PgConnection>, sqlx::Error> {
    let Target { table, columns } = target;
    let mut copy = conn
        .copy_in_raw(&format!(
            "COPY {table} {columns} FROM STDIN (FORMAT binary)"
        ))
        .await?;
    copy.send(HEADER).await?;
    Ok(copy)
}

async fn finish(mut copy: PgCopyIn<&mut PgConnection>) -> Result<(), sqlx::Error> {
    copy.send(TRAILER).await?;
    copy.finish().await?;
    Ok(())
}

/// A field's length: fields are far smaller than the format's limit of 1 GB.
fn length(bytes: usize) -> i32 {
    i32::try_from(bytes).expect("a field of less than 2 GB")
}

/// Whether `ms` after the Unix epoch falls in the years 1970–9999, the times events may carry.
pub fn timestamp_in_range(ms: i64) -> bool {
    const YEAR_10000_MS: i64 = 253_402_300_800_000;
    (0..YEAR_10000_MS).contains(&ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(rows: CopyRows) -> Vec<u8> {
        rows.full.concat().into_iter().chain(rows.data).collect()
    }

    #[test]
    fn fields_are_length_prefixed_and_rows_counted() {
        let mut rows = CopyRows::default();
        rows.text("a\tb")
            .optional(None)
            .int4(-7)
            .int8(1)
            .bytes(&[0, 255]);
        rows.end_row();
        rows.text("second").end_row();
        assert_eq!(rows.rows, 2);
        let expected: Vec<u8> = [
            &[0, 5][..],
            &[0, 0, 0, 3],
            b"a\tb",
            &[255, 255, 255, 255],
            &[0, 0, 0, 4, 255, 255, 255, 249],
            &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1],
            &[0, 0, 0, 2, 0, 255],
            &[0, 1, 0, 0, 0, 6],
            b"second",
        ]
        .concat();
        assert_eq!(sent(rows), expected);
    }

    #[test]
    fn numerics_are_base_10000_digits_without_trailing_zeros() {
        let numeric = |value: i128| {
            let mut rows = CopyRows::default();
            rows.numeric(value).end_row();
            let bytes = sent(rows);
            // Field count, length, then ndigits, weight, sign, dscale and the digits.
            let halves: Vec<u16> = bytes[6..]
                .chunks(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
                .collect();
            assert_eq!(
                i32::from_be_bytes(bytes[2..6].try_into().unwrap()) as usize,
                halves.len() * 2
            );
            halves
        };
        assert_eq!(numeric(0), [0, 0, 0, 0]);
        assert_eq!(numeric(12), [1, 0, 0, 0, 12]);
        assert_eq!(numeric(-12_345), [2, 1, 0x4000, 0, 1, 2_345]);
        assert_eq!(numeric(10_000), [1, 1, 0, 0, 1]);
        assert_eq!(numeric(100_020_000), [2, 2, 0, 0, 1, 2]);
        assert_eq!(numeric(i128::MIN).len(), 4 + 10);
    }

    #[test]
    fn many_rows_fill_chunks_of_whole_rows_in_order() {
        let mut rows = CopyRows::default();
        let mut expected = Vec::new();
        for n in 0..20_000 {
            rows.int8(n).text("row").end_row();
            expected.extend_from_slice(&[0, 2, 0, 0, 0, 8]);
            expected.extend_from_slice(&n.to_be_bytes());
            expected.extend_from_slice(&[0, 0, 0, 3]);
            expected.extend_from_slice(b"row");
        }
        assert!(rows.full.len() > 2, "{} full chunks", rows.full.len());
        let row_bytes = 2 + 4 + 8 + 4 + 3;
        assert!(rows.full.iter().all(|chunk| chunk.len() % row_bytes == 0));
        assert_eq!(sent(rows), expected);
    }

    #[test]
    fn event_times_are_years_1970_to_9999() {
        assert!(timestamp_in_range(0));
        assert!(timestamp_in_range(253_402_300_799_999));
        assert!(!timestamp_in_range(-1));
        assert!(!timestamp_in_range(253_402_300_800_000));
    }
}
