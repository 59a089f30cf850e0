//! Money at the REST edge: the currencies the gateway accepts, with their scales, and exact
//! conversion between decimal strings ("12.34") and integer minor units. Nothing else in the
//! platform sees a decimal.

use rust_decimal::Decimal;
use std::str::FromStr;

/// Currencies and their scales (digits after the decimal point). ISO 4217 where one exists.
const CURRENCIES: &[(&str, u32)] = &[
    ("AUD", 2),
    ("BHD", 3),
    ("BRL", 2),
    ("BTC", 8),
    ("CAD", 2),
    ("CHF", 2),
    ("CNY", 2),
    ("DKK", 2),
    ("ETH", 18),
    ("EUR", 2),
    ("GBP", 2),
    ("HKD", 2),
    ("INR", 2),
    ("JPY", 0),
    ("KRW", 0),
    ("KWD", 3),
    ("MXN", 2),
    ("NOK", 2),
    ("PLN", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("USD", 2),
    ("USDC", 6),
];

/// The largest amount accepted at the edge, in units of the currency (far below the ledger's
/// own bound, so that a sum of a few legs never overflows either).
const UNITS_MAX: i64 = 1_000_000_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Currency {
    pub code: &'static str,
    pub scale: u32,
}

impl Currency {
    pub fn parse(code: &str) -> Option<Currency> {
        CURRENCIES
            .iter()
            .find(|(known, _)| *known == code)
            .map(|&(code, scale)| Currency { code, scale })
    }

    pub fn codes() -> impl Iterator<Item = &'static str> {
        CURRENCIES.iter().map(|(code, _)| *code)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("not a decimal number")]
    Malformed,
    #[error("more than {0} digits after the decimal point")]
    TooPrecise(u32),
    #[error("must be greater than zero")]
    NotPositive,
    #[error("too large")]
    TooLarge,
}

/// Parses a decimal string of `currency` into minor units; any sign is allowed (limits).
pub fn parse_signed(text: &str, currency: Currency) -> Result<i128, AmountError> {
    // Plain decimals only: no exponent, no surrounding space, no leading '+'.
    let plain = text.strip_prefix('-').unwrap_or(text);
    let well_formed = !plain.is_empty()
        && plain.chars().all(|c| c.is_ascii_digit() || c == '.')
        && plain.matches('.').count() <= 1
        && !plain.starts_with('.')
        && !plain.ends_with('.');
    if !well_formed {
        return Err(AmountError::Malformed);
    }
    // Precision is judged on the text, before any rounding a decimal type might do.
    let fraction = plain.split_once('.').map_or("", |(_, fraction)| fraction);
    if fraction.trim_end_matches('0').len() > currency.scale as usize {
        return Err(AmountError::TooPrecise(currency.scale));
    }
    let value = Decimal::from_str(text).map_err(|_| AmountError::TooLarge)?;
    if value.abs() > Decimal::from(UNITS_MAX) {
        return Err(AmountError::TooLarge);
    }
    let minor = value
        .checked_mul(Decimal::from(10i128.pow(currency.scale)))
        .ok_or(AmountError::TooLarge)?;
    // Exact: the precision check above leaves no fraction of a minor unit.
    i128::try_from(minor.trunc()).map_err(|_| AmountError::TooLarge)
}

/// Parses a strictly positive amount (what a payment, deposit or hold moves).
pub fn parse_positive(text: &str, currency: Currency) -> Result<i128, AmountError> {
    let minor = parse_signed(text, currency)?;
    if minor <= 0 {
        return Err(AmountError::NotPositive);
    }
    Ok(minor)
}

/// Formats minor units with exactly `scale` digits after the point ("12.30", "-0.05", "7").
pub fn format(minor: i128, scale: u32) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let digits = minor.unsigned_abs().to_string();
    let scale = scale as usize;
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (units, fraction) = padded.split_at(padded.len() - scale);
    format!("{sign}{units}.{fraction}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd() -> Currency {
        Currency::parse("USD").unwrap()
    }

    #[test]
    fn amounts_parse_exactly_into_minor_units() {
        assert_eq!(parse_positive("12.34", usd()), Ok(1234));
        assert_eq!(parse_positive("12.3", usd()), Ok(1230));
        assert_eq!(parse_positive("12", usd()), Ok(1200));
        assert_eq!(parse_positive("0.01", usd()), Ok(1));
        assert_eq!(parse_positive("12.340", usd()), Ok(1234));
        let jpy = Currency::parse("JPY").unwrap();
        assert_eq!(parse_positive("500", jpy), Ok(500));
        let btc = Currency::parse("BTC").unwrap();
        assert_eq!(parse_positive("0.00000001", btc), Ok(1));
        assert_eq!(parse_signed("-100.50", usd()), Ok(-10050));
    }

    #[test]
    fn bad_amounts_are_rejected() {
        assert_eq!(
            parse_positive("12.345", usd()),
            Err(AmountError::TooPrecise(2))
        );
        let jpy = Currency::parse("JPY").unwrap();
        assert_eq!(parse_positive("1.5", jpy), Err(AmountError::TooPrecise(0)));
        assert_eq!(parse_positive("0", usd()), Err(AmountError::NotPositive));
        assert_eq!(parse_positive("0.00", usd()), Err(AmountError::NotPositive));
        assert_eq!(parse_positive("-1", usd()), Err(AmountError::NotPositive));
        for malformed in [
            "", "abc", "1e3", " 1", "1 ", "+1", "1.", ".5", "1..2", "1.2.3", "--1", "NaN",
        ] {
            assert_eq!(
                parse_positive(malformed, usd()),
                Err(AmountError::Malformed),
                "{malformed:?}"
            );
        }
        assert_eq!(
            parse_positive("1000000000000000.01", usd()),
            Err(AmountError::TooLarge)
        );
        assert_eq!(
            parse_positive("1.0000000000000000000000000000001", usd()),
            Err(AmountError::TooPrecise(2))
        );
        assert_eq!(
            parse_positive("99999999999999999999999999999999999", usd()),
            Err(AmountError::TooLarge)
        );
    }

    #[test]
    fn formatting_shows_exactly_the_scale() {
        assert_eq!(format(1234, 2), "12.34");
        assert_eq!(format(5, 2), "0.05");
        assert_eq!(format(-5, 2), "-0.05");
        assert_eq!(format(0, 2), "0.00");
        assert_eq!(format(500, 0), "500");
        assert_eq!(format(1, 8), "0.00000001");
    }

    #[test]
    fn formatting_and_parsing_round_trip() {
        for minor in [1i128, 7, 99, 100, 101, 123_456_789, 10i128.pow(14)] {
            for code in Currency::codes() {
                let currency = Currency::parse(code).unwrap();
                assert_eq!(
                    parse_positive(&format(minor, currency.scale), currency),
                    Ok(minor)
                );
            }
        }
    }
}
