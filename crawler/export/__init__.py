"""Analysis-ready tables from a job's shards (``crawler export``); needs the ``export`` extra.

``exporter`` runs an export; ``records`` turns record lines into typed rows; ``tables`` (the
one module importing pyarrow) writes them as Parquet or CSV; ``source`` reads a sealed shard;
``destination`` is where files go; ``ledger`` says which shards are exported; ``summary`` what
an export did.
"""
