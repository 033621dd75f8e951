"""Pipeline parallel (GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble) alone and composed with FSDP and TP matches one
process: the schedule's microbatch losses are scaled so that they sum to the batch mean. Also: the last
stage keeps no microbatch logits, the automatic split spares the last stage a remainder layer, and
evaluation under PP equals the single process's."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("plan", ["pp2_gpipe", "pp2_1f1b", "pp2_interleaved_1f1b", "pp2_looped_bfs",
                                  "pp2_interleaved_zero_bubble", "pp2_zbv_zero_bubble"])
def test_pp2_schedule_matches_single_process(assert_plan_matches_reference, plan):
    assert_plan_matches_reference(plan)


@pytest.mark.parametrize("plan", ["pp2_interleaved_1f1b_block_causal", "pp2_interleaved_zero_bubble_block_causal"])
def test_pp2_with_block_causal_attention_matches_single_process(assert_plan_matches_reference, plan):
    # every stage builds the documents' mask from its microbatch's tokens (a keyword of step())
    assert_plan_matches_reference(plan)


def test_evaluation_under_pp_with_block_causal_attention_matches_single_process(assert_plan_validates_like_reference):
    # ... and of eval(), with microbatches of another shape than training's
    assert_plan_validates_like_reference("pp2_interleaved_1f1b_block_causal")


def test_pp2_with_split_point_and_gradient_accumulation_matches_single_process(assert_plan_matches_reference):
    assert_plan_matches_reference("pp2_split_point_grad_accumulation")


@pytest.mark.parametrize("plan", ["pp2_x_fsdp2", "pp2_x_tp2", "pp2_x_fsdp2_x_tp2"])
def test_pp2_composed_with_fsdp_and_tp_matches_single_process(assert_plan_matches_reference, plan):
    assert_plan_matches_reference(plan)


@pytest.mark.parametrize("plan", ["pp2_1f1b", "pp2_interleaved_1f1b", "pp2_x_tp2"])
def test_evaluation_under_pp_matches_single_process(assert_plan_validates_like_reference, plan):
    """The trained model's validation loss: the schedule's forward-only pass over the stages (on
    microbatches of another batch size and length than training's, harness.VALIDATION), the loss
    sent from the last stage to every rank, equals the single process's evaluation."""
    assert_plan_validates_like_reference(plan)


def test_pp2_float8_matches_single_process_accumulating_the_same_microbatches(assert_plan_matches_reference):
    assert_plan_matches_reference("pp2_float8")


@pytest.fixture
def one_rank_pp_mesh():
    """A `pp` mesh of this process alone (gloo): enough for a one-stage pipeline, which is both the
    first and the last stage, without starting processes."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tests.helpers import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("pp",))["pp"]
    finally:
        dist.destroy_process_group()


def _one_stage_pipeline(schedule_name: str, pp_mesh):
    """(args, model, pipeline): a 2-layer debug model as the one stage of a 2-microbatch schedule."""
    import torch

    from torchtitan_like.losses import cross_entropy_loss
    from torchtitan_like.models.llama3 import Transformer, get_flavor
    from torchtitan_like.parallelisms.pipeline import build_pipeline

    args = get_flavor("debugmodel")
    args.vocab_size, args.n_layers = 64, 2
    model = Transformer(args)
    model.init_weights(seed=0)
    pipeline = build_pipeline({0: model}, num_stages=1, schedule_name=schedule_name, n_microbatches=2,
                              grad_accum_steps=1, loss_fn=cross_entropy_loss, pp_mesh=pp_mesh,
                              device=torch.device("cpu"))
    return args, model, pipeline


def test_last_stage_keeps_no_microbatch_logits_after_a_step_or_an_evaluation(one_rank_pp_mesh):
    # Only the microbatch losses are used. By default torch's last stage keeps every microbatch's
    # logits (microbatch x seq x vocab each: GBs at Llama 3's vocabulary) until the next step, and
    # concatenates them into a whole-batch copy.
    import torch

    from torchtitan_like.losses import cross_entropy_loss
    from torchtitan_like.parallelisms.pipeline import pipeline_evaluate, pipeline_forward_backward

    args, model, pipeline = _one_stage_pipeline("GPipe", one_rank_pp_mesh)
    tokens = torch.randint(0, args.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, args.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = cross_entropy_loss(model(tokens), labels)

    trained = pipeline_forward_backward(pipeline, tokens, labels)
    assert pipeline.stages[0].output_chunks == []
    evaluated = pipeline_evaluate(pipeline, tokens, labels)
    assert pipeline.stages[0].output_chunks == []
    torch.testing.assert_close(trained, expected, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(evaluated, expected, rtol=1e-5, atol=0.0)


def test_evaluation_batches_of_another_shape_run_on_stages_of_their_own(one_rank_pp_mesh):
    # A stage learns its input shapes from its first run and torch 2.11 keeps them: a validation
    # batch of another size or length raised PipeliningShapeError there. Such batches now run
    # through stages of their own over the same modules, and training continues on its own.
    import torch

    from torchtitan_like.losses import cross_entropy_loss
    from torchtitan_like.parallelisms.pipeline import pipeline_evaluate, pipeline_forward_backward

    args, model, pipeline = _one_stage_pipeline("1F1B", one_rank_pp_mesh)
    generator = torch.Generator().manual_seed(0)

    def batch(rows, length):
        return (torch.randint(0, args.vocab_size, (rows, length), generator=generator),
                torch.randint(0, args.vocab_size, (rows, length), generator=generator))

    def expected(tokens, labels):
        with torch.no_grad():
            return cross_entropy_loss(model(tokens), labels)

    train_batch = batch(4, 16)
    torch.testing.assert_close(pipeline_forward_backward(pipeline, *train_batch), expected(*train_batch),
                               rtol=1e-5, atol=0.0)
    for rows, length in ((8, 16), (4, 8), (4, 16), (8, 16)):
        evaluation = batch(rows, length)
        torch.testing.assert_close(pipeline_evaluate(pipeline, *evaluation), expected(*evaluation),
                                   rtol=1e-5, atol=0.0, msg=f"{rows}x{length}")
    # one build per other microbatch shape; the training shape evaluates on the training stages
    assert sorted(pipeline.eval_pipelines) == [(2, 8), (4, 16)]
    model.zero_grad()
    torch.testing.assert_close(pipeline_forward_backward(pipeline, *train_batch), expected(*train_batch),
                               rtol=1e-5, atol=0.0)
    assert all(param.grad is not None for param in model.parameters())


@pytest.mark.parametrize("n_layers, num_stages", [(5, 2), (32, 3), (7, 4), (126, 8)])
def test_automatic_split_gives_no_remainder_layer_to_the_last_stage(n_layers, num_stages):
    # The last stage also computes the output projection (2.4 layers' worth for Llama 3 8B): a
    # remainder layer there would make the slowest stage slower still.
    from torchtitan_like.models.llama3.pipeline import stage_layer_ranges

    ranges = stage_layer_ranges(n_layers, num_stages, split_points=[])
    sizes = [len(layers) for layers in ranges]
    assert [layer for layers in ranges for layer in layers] == list(range(n_layers))
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert sizes[-1] == n_layers // num_stages
