-- Run once by the postgres image when it creates its data folder
-- (/docker-entrypoint-initdb.d). Creating the extension needs a superuser; Flywheel itself
-- can then run as an ordinary owner of the database. Knowledge bases use pgvector when the
-- extension is there and fall back to FAISS + BM25 artifacts when it is not.
CREATE EXTENSION IF NOT EXISTS vector;
