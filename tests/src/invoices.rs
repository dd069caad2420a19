//! Retail invoices as newline-delimited JSON: the nested schema of the examples
//! (an address struct, an array of line-item structs), deterministic per seed.

use std::io::Write;
use std::path::Path;

use serde::Serialize;

/// The invoices schema in the pipeline file's DDL form.
pub const INVOICE_SCHEMA: &str = "InvoiceNumber STRING, CreatedTime BIGINT, StoreID STRING, PosID STRING, \
CashierID STRING, CustomerType STRING, CustomerCardNo STRING, TotalAmount DOUBLE, NumberOfItems BIGINT, \
PaymentMethod STRING, TaxableAmount DOUBLE, CGST DOUBLE, SGST DOUBLE, CESS DOUBLE, DeliveryType STRING, \
DeliveryAddress STRUCT<AddressLine STRING, City STRING, ContactNumber STRING, PinCode STRING, State STRING>, \
InvoiceLineItems ARRAY<STRUCT<ItemCode STRING, ItemDescription STRING, ItemPrice DOUBLE, ItemQty BIGINT, TotalValue DOUBLE>>";

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Invoice {
    pub invoice_number: String,
    pub created_time: i64,
    #[serde(rename = "StoreID")]
    pub store_id: String,
    #[serde(rename = "PosID")]
    pub pos_id: String,
    #[serde(rename = "CashierID")]
    pub cashier_id: String,
    pub customer_type: String,
    pub customer_card_no: String,
    pub total_amount: f64,
    pub number_of_items: i64,
    pub payment_method: String,
    pub taxable_amount: f64,
    #[serde(rename = "CGST")]
    pub cgst: f64,
    #[serde(rename = "SGST")]
    pub sgst: f64,
    #[serde(rename = "CESS")]
    pub cess: f64,
    pub delivery_type: String,
    pub delivery_address: Option<Address>,
    pub invoice_line_items: Vec<LineItem>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Address {
    pub address_line: String,
    pub city: String,
    pub contact_number: String,
    pub pin_code: String,
    pub state: String,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct LineItem {
    pub item_code: String,
    pub item_description: String,
    pub item_price: f64,
    pub item_qty: i64,
    pub total_value: f64,
}

const STORES: &[&str] = &["STR7188", "STR8513", "STR9365", "STR2346", "STR5619"];
const CITIES: &[(&str, &str)] = &[
    ("Mumbai", "Maharashtra"),
    ("Pune", "Maharashtra"),
    ("Chennai", "Tamil Nadu"),
    ("Kolkata", "West Bengal"),
    ("Bangalore", "Karnataka"),
];
const ITEMS: &[(&str, &str, f64)] = &[
    ("458", "Wine glass", 1644.0),
    ("283", "Portable Lamps", 2236.0),
    ("596", "Dinner Set", 1940.0),
    ("121", "Electric Kettle", 1399.0),
    ("302", "Coffee Mug", 249.0),
    ("417", "Table Cloth", 799.0),
];

/// Invoice number `index` of the stream for `seed`: the same inputs give the same invoice.
pub fn invoice(seed: u64, index: u64) -> Invoice {
    let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(1_000_003).wrapping_add(index));
    let items: Vec<LineItem> = (0..rng.usize(1..=5))
        .map(|_| {
            let (code, description, price) = ITEMS[rng.usize(..ITEMS.len())];
            let qty = rng.i64(1..=4);
            LineItem {
                item_code: code.into(),
                item_description: description.into(),
                item_price: price,
                item_qty: qty,
                total_value: price * qty as f64,
            }
        })
        .collect();
    let total: f64 = items.iter().map(|i| i.total_value).sum();
    let home = rng.bool();
    let (city, state) = CITIES[rng.usize(..CITIES.len())];
    Invoice {
        invoice_number: format!("{seed}-{index}"),
        created_time: 1_700_000_000_000 + (index as i64) * 1000,
        store_id: STORES[rng.usize(..STORES.len())].into(),
        pos_id: format!("POS{}", rng.u32(100..999)),
        cashier_id: format!("OAS{}", rng.u32(100..999)),
        customer_type: if rng.bool() { "PRIME" } else { "NONPRIME" }.into(),
        customer_card_no: format!("{}", rng.u64(1_000_000_000..9_999_999_999)),
        total_amount: total,
        number_of_items: items.len() as i64,
        payment_method: if rng.bool() { "CARD" } else { "CASH" }.into(),
        taxable_amount: total,
        cgst: total * 0.025,
        sgst: total * 0.025,
        cess: total * 0.00125,
        delivery_type: if home { "HOME-DELIVERY" } else { "TAKEAWAY" }.into(),
        delivery_address: home.then(|| Address {
            address_line: format!("{} Main Road", rng.u32(1..500)),
            city: city.into(),
            contact_number: format!("{}", rng.u64(7_000_000_000..9_999_999_999)),
            pin_code: format!("{}", rng.u32(100_000..999_999)),
            state: state.into(),
        }),
        invoice_line_items: items,
    }
}

/// Writes invoices `first..first + count` of `seed` to `path` as NDJSON; returns the bytes written.
pub fn write_invoice_file(path: &Path, seed: u64, first: u64, count: u64) -> std::io::Result<u64> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut written = 0u64;
    let mut line = Vec::with_capacity(1024);
    for index in first..first + count {
        line.clear();
        serde_json::to_writer(&mut line, &invoice(seed, index))?;
        line.push(b'\n');
        out.write_all(&line)?;
        written += line.len() as u64;
    }
    out.flush()?;
    Ok(written)
}

/// A pipeline file ingesting the invoice files of `./landing` (declared schema)
/// into `./lake/bronze/invoices`, with its checkpoint in `./lake/_checkpoints/<name>`.
pub fn invoice_pipeline(name: &str, trigger: &str, max_files_per_batch: u32) -> String {
    format!(
        r#"
pipeline: {name}
checkpoint: ./lake/_checkpoints/{name}
trigger: {trigger}
flows:
  - name: invoices_bronze
    source:
      files:
        path: ./landing
        format: json
        schema: "{INVOICE_SCHEMA}"
        max_files_per_batch: {max_files_per_batch}
    sink:
      table: ./lake/bronze/invoices
"#
    )
}
