"""The model folder a run leaves is a sentence-transformers model and an mteb model: loaded by them it embeds as
model.encode does, and mteb's scores of a built-in task equal eval.py's."""
import json

import numpy as np
import pytest
import torch
from datasets import Dataset

import builtin
import checkpoint
import eval as ev
import model as f2llm_model

TEXTS = ["how to sort a list", "", "naïve café ☕ 数学 — ünïcödé", "a literal <|im_end|> inside", "words " * 200, "  spaced  "]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny):
    model, tokenizer = tiny
    tokenizer("leave some truncation state behind", truncation=True, max_length=5)  # as training calls do
    out = tmp_path_factory.mktemp("run")
    checkpoint.export_model(str(out), model.backbone, model.backbone.state_dict(), tokenizer, 32, builtin.RETRIEVAL_INSTRUCTION, "card")
    return out / "checkpoint"


def test_sentence_transformers_embeds_as_model_encode(exported):
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(str(exported), device="cpu")
    model, tokenizer = f2llm_model.load(str(exported))
    saved = json.loads((exported / "tokenizer.json").read_text())
    assert saved["truncation"] is None and json.loads((exported / "tokenizer_config.json").read_text())["model_max_length"] == 32
    for prompt_name in (None, "query"):
        prompt = f2llm_model.query_prompt(builtin.RETRIEVAL_INSTRUCTION) if prompt_name else None
        features = st.preprocess([(prompt or "") + t for t in TEXTS])
        ids = [row[mask.bool()].tolist() for row, mask in zip(features["input_ids"], features["attention_mask"])]
        assert ids == f2llm_model.tokenize(tokenizer, [(prompt or "") + t for t in TEXTS], 32)  # text cut to 31 tokens, then EOS
        ours = f2llm_model.encode(model, tokenizer, TEXTS, prompt, max_len=32)
        theirs = st.encode(TEXTS, prompt_name=prompt_name, convert_to_tensor=True)
        torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)


def test_mteb_with_f2llms_registered_settings_scores_as_eval_py(exported, tmp_path):
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.mocks.mock_tasks.retrieval import general_args
    from mteb.models.model_implementations.codefuse_models import F2LLM_0B6
    folder = builtin.tasks(str(tmp_path / "tasks"))[0]
    task = ev.load_task(folder)
    ours = ev.evaluate(*f2llm_model.load(str(exported)), [folder], max_len=8192)[0]["scores"]

    class StdlibCodeRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(type="Retrieval", name="StdlibCodeRetrieval", main_score="ndcg_at_10", prompt=task["instruction"], **general_args)
    mteb_task = StdlibCodeRetrieval()
    corpus = [dict(id=str(d["_id"]), title=d.get("title", ""), text=d["text"]) for d in task["corpus"]]
    queries = [dict(id=str(q["_id"]), text=q["text"]) for q in task["queries"]]
    mteb_task.dataset = {"default": {"test": RetrievalSplitData(corpus=Dataset.from_list(corpus), queries=Dataset.from_list(queries),
                                                                relevant_docs=task["qrels"], top_ranked=None)}}
    mteb_task.data_loaded = True
    model = F2LLM_0B6.loader(str(exported), revision=None, device="cpu", **F2LLM_0B6.loader_kwargs)  # F2LLM's own MTEB settings
    theirs = mteb_task.evaluate(model, "test", encode_kwargs={"batch_size": 32, "show_progress_bar": False})["default"]
    shared = [k for k in ours if k in theirs]
    assert len(shared) >= 40
    largest = max(abs(ours[k] - theirs[k]) for k in shared)
    print(f"\nmteb route vs eval.py on StdlibCodeRetrieval: nDCG@10 {theirs['ndcg_at_10']} vs {ours['ndcg_at_10']}, largest difference {largest:.1e}")
    assert largest <= 1e-5, {k: (ours[k], theirs[k]) for k in shared if abs(ours[k] - theirs[k]) > 1e-5}
    assert np.isfinite(ours["ndcg_at_10"]) and ours["ndcg_at_10"] > 0


def test_sentence_transformers_truncate_dim_embeds_as_eval_py_at_that_dimension(exported):
    # A Matryoshka model's smaller embeddings: the first D coordinates, normalised again (eval.py --dims D).
    from sentence_transformers import SentenceTransformer
    model, tokenizer = f2llm_model.load(str(exported))
    embed = lambda texts, is_query: f2llm_model.encode(model, tokenizer, texts, max_len=32)
    for dim in (64, 8):
        st = SentenceTransformer(str(exported), device="cpu", truncate_dim=dim)
        theirs = st.encode(TEXTS, normalize_embeddings=True, convert_to_tensor=True)
        assert theirs.shape == (len(TEXTS), dim)
        torch.testing.assert_close(theirs, ev.at_dim(embed, dim)(TEXTS, False), atol=1e-6, rtol=0)


def test_an_eos_that_is_the_pad_is_the_one_the_exported_tokenizer_appends(tmp_path, tiny):
    # Qwen3-Base and Qwen3-Embedding tokenizers have one token for eos and pad: the model folder appends that one, as
    # training did, so sentence-transformers pools where our encoder pools.
    from sentence_transformers import SentenceTransformer
    model, tokenizer = tiny[0], builtin.qwen3_tokenizer()
    tokenizer.eos_token = tokenizer.pad_token
    checkpoint.export_model(str(tmp_path), model.backbone, model.backbone.state_dict(), tokenizer, 32, "find it", "card")
    loaded = f2llm_model.load(str(tmp_path / "checkpoint"))[1]
    assert loaded.eos_token_id == loaded.pad_token_id == tokenizer.eos_token_id == 151643
    st = SentenceTransformer(str(tmp_path / "checkpoint"), device="cpu")
    torch.testing.assert_close(st.encode(TEXTS, convert_to_tensor=True), f2llm_model.encode(model, tokenizer, TEXTS, max_len=32), atol=1e-6, rtol=0)
