//! An account and the arithmetic of debits, credits and holds on it.

use serde::{Deserialize, Serialize};

use super::command::Limits;
use super::outcome::{Outcome, Rejection};
use super::types::{AccountId, Amount, Currency, Metadata};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AccountState {
    Active,
    Frozen,
    Closed,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Account {
    pub id: AccountId,
    pub currency: Currency,
    pub scale: u8,
    pub state: AccountState,
    pub balance: Amount,
    /// Debits held by reservations, not yet posted.
    pub pending_out: Amount,
    /// Credits reserved by reservations, not yet posted; not spendable.
    pub pending_in: Amount,
    pub limits: Limits,
    /// +1 on every change.
    pub version: u64,
    pub metadata: Metadata,
}

fn overflow(account: &Account) -> Rejection {
    Rejection::on(Outcome::AmountOverflow, &account.id)
}

impl Account {
    /// `balance - pending_out`: what a debit may spend down to the lower limit.
    pub fn available(&self) -> Option<Amount> {
        self.balance.checked_sub(self.pending_out)
    }

    /// Whether the account is within both of its limits as it stands.
    pub fn within_limits(&self) -> bool {
        within_limits(
            &self.limits,
            self.balance,
            self.pending_out,
            self.pending_in,
        )
    }

    /// Moves `delta` (signed) into the posted balance. A debit must keep `available` at or above
    /// the lower limit; a credit must keep `balance + pending_in` at or below the upper limit.
    pub fn move_balance(&mut self, delta: Amount) -> Result<(), Rejection> {
        let balance = self
            .balance
            .checked_add(delta)
            .ok_or_else(|| overflow(self))?;
        self.check_limits(balance, self.pending_out, self.pending_in, delta)?;
        self.balance = balance;
        self.version += 1;
        Ok(())
    }

    /// Holds `delta` (signed): a debit grows `pending_out`, a credit grows `pending_in`, each
    /// checked against the limit it could break once posted.
    pub fn hold(&mut self, delta: Amount) -> Result<(), Rejection> {
        let (pending_out, pending_in) =
            self.pending_after(delta, 1).ok_or_else(|| overflow(self))?;
        self.check_limits(self.balance, pending_out, pending_in, delta)?;
        self.pending_out = pending_out;
        self.pending_in = pending_in;
        self.version += 1;
        Ok(())
    }

    /// Releases a hold made by `hold(delta)`. Cannot fail: it only shrinks what is pending.
    pub fn release(&mut self, delta: Amount) {
        let (pending_out, pending_in) = self
            .pending_after(delta, -1)
            .expect("a release undoes an earlier hold");
        self.pending_out = pending_out;
        self.pending_in = pending_in;
        self.version += 1;
    }

    /// Posts a hold made by `hold(delta)`: the pending amount becomes balance. Cannot fail: the
    /// hold already checked the limits and the range.
    pub fn post(&mut self, delta: Amount) {
        let (pending_out, pending_in) = self
            .pending_after(delta, -1)
            .expect("a post settles an earlier hold");
        self.pending_out = pending_out;
        self.pending_in = pending_in;
        self.balance = self
            .balance
            .checked_add(delta)
            .expect("a posted hold fits its range");
        self.version += 1;
    }

    /// Captures a hold of `held` (in `pending_out`) for `captured <= held`: the captured amount
    /// leaves the balance and the rest is released. Cannot fail: the hold checked the limits.
    pub fn capture(&mut self, held: Amount, captured: Amount) {
        self.pending_out = self
            .pending_out
            .checked_sub(held)
            .expect("a capture settles an earlier hold");
        self.balance = self
            .balance
            .checked_sub(captured)
            .expect("a captured hold fits its range");
        self.version += 1;
    }

    fn pending_after(&self, delta: Amount, direction: i128) -> Option<(Amount, Amount)> {
        let magnitude = Amount(delta.0.checked_abs()?.checked_mul(direction)?);
        if delta.0 < 0 {
            Some((self.pending_out.checked_add(magnitude)?, self.pending_in))
        } else {
            Some((self.pending_out, self.pending_in.checked_add(magnitude)?))
        }
    }

    fn check_limits(
        &self,
        balance: Amount,
        pending_out: Amount,
        pending_in: Amount,
        delta: Amount,
    ) -> Result<(), Rejection> {
        let available = balance
            .checked_sub(pending_out)
            .ok_or_else(|| overflow(self))?;
        let committed = balance
            .checked_add(pending_in)
            .ok_or_else(|| overflow(self))?;
        if delta.0 < 0 && self.limits.lower.is_some_and(|lower| available < lower) {
            return Err(Rejection::on(Outcome::InsufficientFunds, &self.id));
        }
        if delta.0 > 0 && self.limits.upper.is_some_and(|upper| committed > upper) {
            return Err(Rejection::on(Outcome::LimitExceeded, &self.id));
        }
        Ok(())
    }
}

/// Whether an account with these amounts sits within `limits`.
pub fn within_limits(
    limits: &Limits,
    balance: Amount,
    pending_out: Amount,
    pending_in: Amount,
) -> bool {
    let available = balance.checked_sub(pending_out);
    let committed = balance.checked_add(pending_in);
    let lower_ok = match (limits.lower, available) {
        (Some(lower), Some(available)) => available >= lower,
        (Some(_), None) => false,
        (None, _) => true,
    };
    let upper_ok = match (limits.upper, committed) {
        (Some(upper), Some(committed)) => committed <= upper,
        (Some(_), None) => false,
        (None, _) => true,
    };
    lower_ok && upper_ok
}
