"""Reading a parquet corpus: the strings of the requested columns, row by row, a record batch at
a time, or a clear problem naming the file (and, for a problem in the data, the row group and row;
both count from 0, as pyarrow does).

Memory holds one row group of the requested columns, never the whole file nor the other columns:
pyarrow (26) decodes a row group whole before it slices it into batches.
pyarrow is imported only when a parquet file is read, so that a JSONL corpus does not need it.
"""

# Rows turned into Python strings at a time: a bound on those copies of long documents. Small
# batches cost under a microsecond a row more than large ones, nothing beside tokenizing the row.
BATCH_ROWS = 64


def _import_pyarrow(path: str):
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as e:
        raise ImportError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from e
    return pyarrow


def parquet_rows(path: str, columns: list[str], batch_rows: int = BATCH_ROWS):
    """Yield (location, texts) for each row of a parquet file, texts holding the string in each of
    `columns`; ValueError for a file that cannot be read, a column that is missing or not of
    strings, and a null value."""
    pa = _import_pyarrow(path)
    # OSError: what pyarrow raises for a damaged page; UnicodeDecodeError: a string column holding
    # bytes that are not UTF-8 (pyarrow does not check them when it reads).
    read_errors = (pa.ArrowException, OSError, UnicodeDecodeError)
    try:
        parquet_file = pa.parquet.ParquetFile(path)
    except read_errors as e:
        raise ValueError(f"{path}: not a readable parquet file: {e}") from e
    with parquet_file:
        schema = parquet_file.schema_arrow
        for column in columns:
            if column not in schema.names:
                raise ValueError(f"{path}: no column {column!r}; columns present: {', '.join(schema.names)}")
            column_type = schema.field(column).type
            if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
                raise ValueError(f"{path}: column {column!r} is {column_type}, not a string")

        row = 0
        # One row group at a time, so that an error can name the group it is in.
        for group in range(parquet_file.num_row_groups):
            batches = parquet_file.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns)
            while True:
                try:
                    batch = next(batches, None)
                    rows = None if batch is None else list(zip(*(batch.column(column).to_pylist()
                                                                 for column in columns)))
                except read_errors as e:
                    raise ValueError(f"{path}: row group {group}: cannot read: {e}") from e
                if rows is None:
                    break
                for texts in rows:
                    location = f"{path}: row {row} (row group {group})"
                    if None in texts:
                        raise ValueError(f"{location}: column {columns[texts.index(None)]!r} is null")
                    yield location, texts
                    row += 1
