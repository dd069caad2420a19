//! The sink table's schema: derived from what the flow produces, and checked
//! against an existing table before any task runs.

use arrow::datatypes::{DataType, Schema};

pub use sluice_worker::conform::to_delta;

/// Checks that rows of `produced` can be appended to a table with `table`'s schema.
/// A column the flow does not produce is written as NULL; a column the table
/// lacks, or a type that differs, is an error (schema evolution is not automatic).
pub fn check_appendable(table: &Schema, produced: &Schema) -> Result<(), String> {
    for field in produced.fields() {
        match table.field_with_name(field.name()) {
            Err(_) => {
                return Err(format!(
                    "the flow produces column `{}`, which the table does not have (table columns: {})",
                    field.name(),
                    column_list(table)
                ));
            }
            Ok(existing) if !same_type(existing.data_type(), field.data_type()) => {
                return Err(format!(
                    "column `{}` is {} in the table but the flow produces {}",
                    field.name(),
                    existing.data_type(),
                    field.data_type()
                ));
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

fn column_list(schema: &Schema) -> String {
    schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
}

/// Types equal up to nullability and field metadata.
fn same_type(a: &DataType, b: &DataType) -> bool {
    match (a, b) {
        (DataType::Struct(x), DataType::Struct(y)) => {
            x.len() == y.len()
                && x.iter().zip(y.iter()).all(|(f, g)| f.name() == g.name() && same_type(f.data_type(), g.data_type()))
        }
        (DataType::List(x), DataType::List(y)) | (DataType::LargeList(x), DataType::LargeList(y)) => {
            same_type(x.data_type(), y.data_type())
        }
        (DataType::Map(x, _), DataType::Map(y, _)) => same_type(x.data_type(), y.data_type()),
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::Field;

    #[test]
    fn extra_columns_and_type_changes_are_refused() {
        let table = Schema::new(vec![Field::new("a", DataType::Int64, true), Field::new("b", DataType::Utf8, true)]);
        assert!(check_appendable(&table, &Schema::new(vec![Field::new("a", DataType::Int64, false)])).is_ok());
        let err = check_appendable(&table, &Schema::new(vec![Field::new("c", DataType::Int64, true)])).unwrap_err();
        assert!(err.contains("`c`") && err.contains("a, b"), "{err}");
        let err = check_appendable(&table, &Schema::new(vec![Field::new("a", DataType::Utf8, true)])).unwrap_err();
        assert!(err.contains("column `a` is Int64"), "{err}");
    }
}
