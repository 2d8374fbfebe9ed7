"""Data: canonical records, source adapters, targets, tokenised batches.

    schema.py            Conversation, AxisRating, RatedExample, AXES
    readers.py           row readers with file:line errors, skip policy, atomic writes
    sources.py           the six public sources (+ synthetic) -> Conversations; SOURCES
    synthetic.py         generated corpus rated by simulated annotators
    chitchat_degraded.py real chitchat turns, degraded per axis, rated by the same annotators
    id_hash.py           where an id belongs (split and sampling hashes)
    splits.py            hashed train/test split, sampling, build_datasets()
    rubrics.py           what each axis means (annotators and training prompt share it)
    annotation_prompts.py  four annotator prompt variants, strict answer parsing
    openai_client.py     Annotator protocol, OpenAI-compatible client with retries
    annotation.py        cached ensemble runs; aggregate.py: scores -> label
    export.py, tfds_builder.py  JSONL + TFDS (array_record) outputs
    targets.py           label_only / explanation / pseudo-explanation targets
    encode.py, pipeline.py  prompt + tokenisation, grain batches (DESIGN batch contract)

Modules are imported where used; importing this package stays cheap.
"""
