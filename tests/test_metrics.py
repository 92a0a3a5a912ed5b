import torch

import manyheads as mh
from conftest import make_net, make_table
from manyheads.metrics import EpochOutputs


def test_epoch_outputs_fill_buffers_allocated_once():
    seen = EpochOutputs(rows=5)
    assert not seen
    for start, size in ((0, 2), (2, 2), (4, 1)):  # a short last batch
        rows = torch.arange(start, start + size)
        outputs = {"race": rows[:, None].float().expand(size, 3) * 1.0, "age": rows.float()}
        seen.add(outputs, {"race": rows % 3, "age": rows.float()}, {"race": rows != 1, "age": rows >= 0})
        pointer = seen.buffers["race"][0].data_ptr()
        if start == 0:
            first = pointer
        assert pointer == first  # filled in place, never regrown
    out, target, labelled = seen["race"]
    assert out.shape == (5, 3) and torch.equal(out[:, 0], torch.arange(5.0))
    assert torch.equal(target, torch.arange(5) % 3) and labelled.tolist() == [True, False, True, True, True]
    assert seen["age"][0].shape == (5,)


def test_training_metrics_cover_every_row_of_the_epoch():
    table = make_table(n=150)  # batches of 64, 64 and 22 rows
    net = make_net()
    result = mh.fit(net, table, epochs=1, batch_size=64, lr=0.0, seed=0, progress=False)
    with torch.no_grad():  # lr 0 and no normalisation layers: training outputs equal these
        outputs = net(torch.as_tensor(table["x"]))
    ages = torch.tensor([float(a) for a in table["age"]])
    expected = mh.Regression().metrics(outputs["age"], ages)
    assert abs(result.history["train/age/mae"].iloc[0] - expected["mae"]) < 1e-4
    assert result.history["train/race/labels"].iloc[0] == 150
