"""The playground: one self-contained page (no external assets) that talks to the server's own API.

Enter a key, pick a profile and/or categories, chat; every reply shows the policy the server
applied and which category's rule refused (if any). It uses only public endpoints, so it is also a
worked example of the API extensions.
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MOSAIC playground</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;max-width:860px;margin:1.5em auto;padding:0 1em;color:#222}
 fieldset{border:1px solid #ccc;border-radius:6px;margin-bottom:1em}
 label{margin-right:1em;white-space:nowrap} #log{border:1px solid #ddd;border-radius:6px;padding:.5em;min-height:8em}
 .turn{margin:.4em 0}.user{color:#035}.reply{white-space:pre-wrap}.meta{font-size:.85em;color:#555}
 .refused{color:#a00;font-weight:600} #error{color:#a00} textarea{width:100%;box-sizing:border-box}
</style></head>
<body>
<h1>MOSAIC playground</h1>
<fieldset><legend>Access</legend>
 <label>API key <input id="key" type="password" size="32" autocomplete="off"></label>
 <button id="load">Connect</button> <span id="who" class="meta"></span>
</fieldset>
<fieldset><legend>Policy</legend>
 <label>Profile <select id="profile"><option value="">(key default)</option></select></label>
 <div id="categories" class="meta">Connect to list categories.</div>
 <div class="meta">Your key's floor always applies; choices here can only add categories.</div>
</fieldset>
<div id="log"></div>
<p><textarea id="message" rows="3" placeholder="Say something"></textarea></p>
<p><button id="send" disabled>Send</button> <button id="reset">New chat</button>
 <label>max tokens <input id="max" type="number" value="64" min="1" style="width:5em"></label></p>
<p id="error" role="alert"></p>
<script>
const $ = (id) => document.getElementById(id);
let model = null, history = [];
function headers(){ const k=$("key").value.trim(); const h={"Content-Type":"application/json"};
  if(k) h["Authorization"]="Bearer "+k; return h; }
function esc(t){ const d=document.createElement("div"); d.textContent=t; return d.innerHTML; }
async function errorText(r){ try{ const j=await r.json(); return j.error?j.error.message:r.statusText; }
  catch(e){ return r.statusText; } }
async function connect(){
  $("error").textContent="";
  const r = await fetch("/v1/safety", {headers: headers()});
  if(!r.ok){ $("error").textContent = "HTTP "+r.status+": "+await errorText(r); return; }
  const s = await r.json(); model = s.model;
  const sel=$("profile"); sel.length=1;
  for(const p of Object.keys(s.profiles)){ const o=document.createElement("option"); o.value=p;
    o.textContent=p+" ("+(s.profiles[p].join(", ")||"no categories")+")"; sel.appendChild(o); }
  $("categories").innerHTML = s.categories.map(c =>
    '<label><input type="checkbox" value="'+esc(c.name)+'"'+
    (s.key&&s.key.floor.includes(c.name)?" checked disabled":"")+
    "> "+esc(c.display)+"</label>").join("");
  $("who").textContent = s.key ? ("key "+s.key.name+", profile "+s.key.profile+", floor: "+
    (s.key.floor.join(", ")||"none")) : "no key needed";
  $("send").disabled=false;
}
async function send(){
  const text=$("message").value.trim(); if(!text||!model) return;
  $("error").textContent=""; $("send").disabled=true;
  history.push({role:"user",content:text});
  const cats=[...document.querySelectorAll("#categories input:checked:not(:disabled)")].map(x=>x.value);
  const safety={}; if(cats.length) safety.categories=cats;
  const prof=$("profile").value; if(prof) safety.profile=prof;
  const body={model:model,messages:history,max_tokens:parseInt($("max").value)||64,safety:safety};
  try{
    const r=await fetch("/v1/chat/completions",{method:"POST",headers:headers(),body:JSON.stringify(body)});
    if(!r.ok){ history.pop(); $("error").textContent="HTTP "+r.status+": "+await errorText(r); return; }
    const j=await r.json(); const reply=j.choices[0].message.content; const s=j.safety;
    history.push({role:"assistant",content:reply});
    const rule = s.refused ? '<span class="refused rule">refused by rule: '+esc(s.rule)+"</span>"
                           : '<span class="rule">not refused</span>';
    $("log").insertAdjacentHTML("beforeend",
      '<div class="turn user">you: '+esc(text)+"</div>"+
      '<div class="turn"><div class="reply">'+esc(reply)+'</div><div class="meta">policy: <span class="policy">'+
      esc(s.categories.join(", ")||"(none)")+"</span>"+
      (s.profile?" (profile "+esc(s.profile)+")":"")+" · "+rule+"</div></div>");
    $("message").value="";
  } finally { $("send").disabled=false; }
}
$("load").onclick=connect; $("send").onclick=send;
$("reset").onclick=()=>{history=[];$("log").innerHTML="";};
$("message").addEventListener("keydown",e=>{ if(e.key==="Enter"&&!e.shiftKey){e.preventDefault();send();} });
</script></body></html>
"""
