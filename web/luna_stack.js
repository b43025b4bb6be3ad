// Luna Stack's settings in ComfyUI's settings dialog. The frontend stores them in the user's
// comfy.settings.json, where the pack reads them (comfy_nodes/zero_edit.py); LUNA_ZERO_EDIT wins.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "LunaStack",
  settings: [
    {
      id: "LunaStack.ZeroEdit",
      category: ["Luna Stack", "Loaders", "Zero-edit mode"],
      name: "ComfyUI's own loaders use the shared models the stack serves",
      tooltip:
        "CheckpointLoaderSimple, UNETLoader, CLIPLoader, DualCLIPLoader and VAELoader return Luna Stack's " +
        "shared models when the stack serves the named file, and load locally (with a log line) when it " +
        "does not. Takes effect for loaders run after the change. The LUNA_ZERO_EDIT environment " +
        "variable, when set, wins.",
      type: "boolean",
      defaultValue: false,
    },
  ],
});
