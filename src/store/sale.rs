//! A credit sale as one durable step: the account (new, or the buyer's), its new key when the
//! buyer had none, and the top-up, in one sled transaction and one fsync. A crash leaves either
//! all of it or none of it; the top-up's reference (the x402 authorization) makes a repeated
//! sale of the same payment credit once.

use serde::Serialize;
use sled::Transactional;

use super::accounts::{
    Account, AccountId, Fact, FactKind, KeyRecord, answer, json_tx, next, parse_tx, settle_tx,
};
use super::{Store, StoreError};

/// What a sale asks for.
#[derive(Debug, Clone)]
pub struct CreditSale<'a> {
    /// The buyer's account, or `None` to open one named `name` with a new key.
    pub account: Option<AccountId>,
    pub name: &'a str,
    pub key_label: &'a str,
    pub credits: u128,
    /// The payment that bought the credits: `x402:<network>:<payer>:<nonce>`.
    pub reference: &'a str,
}

/// What a sale did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sold {
    pub account: AccountId,
    /// The new key (shown once) and its record, when an account was opened.
    #[serde(skip)]
    pub key: Option<(String, KeyRecord)>,
    /// The top-up (or the earlier one with the same reference).
    pub fact: Fact,
}

/// Why a sale did not credit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaleRefused {
    NoAccount,
    /// The reference credited a different amount before.
    ReferenceReused,
    Overflow,
    /// A new key's id clashed with an existing one (draw again).
    KeyClash,
}

impl Store {
    /// Sells credits in one transaction (see the module docs); durable before it returns.
    pub async fn sell_credits(
        &self,
        sale: &CreditSale<'_>,
        now: u64,
    ) -> Result<Result<Sold, SaleRefused>, StoreError> {
        loop {
            let key = match sale.account {
                Some(_) => None,
                None => Some(super::accounts::new_key(
                    sale.key_label,
                    now,
                    &self.trees.db,
                )?),
            };
            let t = &*self.trees;
            let result = (
                &t.meta,
                &t.accounts,
                &t.balances,
                &t.ledger,
                &t.account_ledger,
                &t.topup_refs,
                &t.keys,
                &t.key_hashes,
            )
                .transaction(
                    |(meta, accounts, balances, ledger, index, refs, keys, hashes)| {
                        let account = match sale.account {
                            Some(id) => {
                                if accounts.get(id.to_be_bytes())?.is_none() {
                                    return answer(SaleRefused::NoAccount);
                                }
                                id
                            }
                            None => {
                                let account = Account {
                                    id: next(meta, "account")?,
                                    name: sale.name.to_string(),
                                    created_at: now,
                                };
                                accounts.insert(&account.id.to_be_bytes(), json_tx(&account)?)?;
                                account.id
                            }
                        };
                        let mut issued = None;
                        if let Some((secret, record, hash)) = &key {
                            if keys.get(record.id.as_bytes())?.is_some() {
                                return answer(SaleRefused::KeyClash);
                            }
                            let mut record = record.clone();
                            record.account = account;
                            keys.insert(record.id.as_bytes(), json_tx(&record)?)?;
                            hashes.insert(&hash[..], record.id.as_bytes())?;
                            issued = Some((secret.clone(), record));
                        }
                        let reference_key =
                            super::accounts::pair(account, sale.reference.as_bytes());
                        if let Some(seq) = refs.get(&reference_key)? {
                            let earlier: Fact = match ledger.get(seq)? {
                                Some(bytes) => parse_tx(&bytes)?,
                                None => return answer(SaleRefused::NoAccount),
                            };
                            if earlier.credits != sale.credits {
                                return answer(SaleRefused::ReferenceReused);
                            }
                            return Ok(Sold {
                                account,
                                key: issued,
                                fact: earlier,
                            });
                        }
                        let id = account.to_be_bytes();
                        let Some(balance) =
                            super::accounts::u128_of(balances.get(id)?).checked_add(sale.credits)
                        else {
                            return answer(SaleRefused::Overflow);
                        };
                        balances.insert(&id, &balance.to_be_bytes())?;
                        let mut fact =
                            Fact::new(account, FactKind::Topup, sale.credits, balance, now);
                        fact.reference = Some(sale.reference.to_string());
                        let books = super::accounts::Books {
                            meta,
                            balances,
                            ledger,
                            index,
                        };
                        let fact = super::accounts::append(&books, fact)?;
                        refs.insert(reference_key, &fact.seq.to_be_bytes())?;
                        Ok(Sold {
                            account,
                            key: issued,
                            fact,
                        })
                    },
                );
            match settle_tx(result)? {
                Err(SaleRefused::KeyClash) => continue,
                Err(refused) => return Ok(Err(refused)),
                Ok(sold) => {
                    self.durable().await?;
                    return Ok(Ok(sold));
                }
            }
        }
    }
}
