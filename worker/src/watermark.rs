//! Watermark reads: only the rows whose column is beyond the last watermark,
//! and the highest value seen, which becomes the next watermark.
//!
//! A column's values are compared as numbers: integers as they are, times
//! (timestamps of any unit and time zone, dates) as microseconds since the
//! epoch, UTC. Rows whose column is NULL are never beyond a watermark.

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch};
use arrow::compute::kernels::cmp::gt;
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::{DataType, Int64Type, TimeUnit};
use datafusion::common::{Column, ScalarValue};
use datafusion::logical_expr::{Expr, cast as cast_expr, col, lit};
use sluice_proto::task::WatermarkRead;

/// How a column's values are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatermarkKind {
    Number,
    /// Microseconds since the epoch.
    Time,
}

impl WatermarkKind {
    /// `None` for a type a watermark cannot follow.
    pub fn of(data_type: &DataType) -> Option<Self> {
        match data_type {
            DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32 => Some(Self::Number),
            DataType::Timestamp(_, _) | DataType::Date32 | DataType::Date64 => Some(Self::Time),
            _ => None,
        }
    }
}

fn utc_micros() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The column's values as numbers.
pub fn values(column: &ArrayRef) -> Result<Int64Array, String> {
    let numbers = match WatermarkKind::of(column.data_type()) {
        Some(WatermarkKind::Number) => cast(column, &DataType::Int64),
        Some(WatermarkKind::Time) => cast(column, &utc_micros()).and_then(|t| cast(&t, &DataType::Int64)),
        None => return Err(format!("a watermark cannot follow a column of type {}", column.data_type())),
    }
    .map_err(|e| e.to_string())?;
    Ok(numbers.as_primitive::<Int64Type>().clone())
}

/// A filter the scan can use to skip files: it keeps at least every row beyond
/// `after` (rounding only ever keeps more), the exact cut is made by [`Cut`].
pub fn scan_hint(column: &str, data_type: &DataType, after: i64) -> Option<Expr> {
    let bound = match WatermarkKind::of(data_type)? {
        WatermarkKind::Number => lit(after),
        WatermarkKind::Time => lit(ScalarValue::TimestampMicrosecond(Some(after), Some("UTC".into()))),
    };
    let column = col(Column::from_name(column));
    Some(column.gt_eq(cast_expr(bound, data_type.clone())))
}

/// Cuts batches to the rows beyond the watermark and keeps the highest value.
pub struct Cut {
    read: WatermarkRead,
    pub max: Option<i64>,
}

impl Cut {
    pub fn new(read: WatermarkRead) -> Self {
        Self { read, max: None }
    }

    pub fn apply(&mut self, batch: &RecordBatch) -> Result<RecordBatch, String> {
        let column = batch
            .column_by_name(&self.read.column)
            .ok_or_else(|| format!("the source has no column `{}` for the watermark", self.read.column))?;
        let numbers = values(column)?;
        let keep: BooleanArray = match self.read.after {
            Some(after) => gt(&numbers, &Int64Array::new_scalar(after)).map_err(|e| e.to_string())?,
            None => (0..numbers.len()).map(|i| Some(numbers.is_valid(i))).collect(),
        };
        let kept = arrow::compute::filter(&numbers, &keep).map_err(|e| e.to_string())?;
        if let Some(max) = arrow::compute::max(kept.as_primitive::<Int64Type>()) {
            self.max = Some(self.max.map_or(max, |m| m.max(max)));
        }
        filter_record_batch(batch, &keep).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use arrow::array::{Date32Array, TimestampMillisecondArray};
    use arrow::datatypes::{Field, Schema};

    #[test]
    fn cuts_at_the_watermark_and_keeps_the_highest_value() {
        let times: ArrayRef =
            Arc::new(TimestampMillisecondArray::from(vec![Some(1_000), Some(3_000), None, Some(2_000)]));
        let schema = Arc::new(Schema::new(vec![Field::new("t", times.data_type().clone(), true)]));
        let batch = RecordBatch::try_new(schema, vec![times]).unwrap();
        let mut cut = Cut::new(WatermarkRead { column: "t".into(), after: Some(1_500_000) });
        let kept = cut.apply(&batch).unwrap();
        assert_eq!(kept.num_rows(), 2);
        assert_eq!(cut.max, Some(3_000_000));
        let dates: ArrayRef = Arc::new(Date32Array::from(vec![1]));
        assert_eq!(values(&dates).unwrap().value(0), 86_400_000_000);
    }
}
