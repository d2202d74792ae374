import torch

from kernels import route_slots_ref


def test_a_step_after_an_end_token_runs_on_the_scratch_slot():
    """Slot 2 is fed its end id (7) in step one: that step still runs on slot 2 and sets its flag;
    step two routes slot 2's row to the scratch slot (4). Slot 0 is fed 7, which ends only slot 2's
    sequence, and -1, the table's padding: neither ends it. The padding row sets no flag."""
    scratch = 4
    ended = torch.zeros(5, dtype=torch.bool)
    end_ids = torch.full((5, 2), -1)
    end_ids[2] = torch.tensor([7, 9])
    end_ids[0, 0] = 3
    slots = torch.tensor([2, 0, scratch])
    assert route_slots_ref(torch.tensor([7, 7, 3]), slots, ended, end_ids, scratch).tolist() == [2, 0, 4]
    assert ended.tolist() == [False, False, True, False, False]
    assert route_slots_ref(torch.tensor([5, -1, 3]), slots, ended, end_ids, scratch).tolist() == [4, 0, 4]
    assert ended.tolist() == [False, False, True, False, False]
    assert route_slots_ref(torch.tensor([5, 3]), slots[:2], ended, end_ids, scratch).tolist() == [4, 0]
    assert ended.tolist() == [True, False, True, False, False]
